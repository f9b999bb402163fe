"""Experiment specs: shipped files validate, overrides apply, bad input names the key."""

from pathlib import Path

import pytest

from dtlab.trainers.spec import SpecError, dump_spec, load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.model.type in ("standard", "mod", "dtf")


def test_shipped_scratch_and_transfer_specs_exist():
    names = {p.name for p in (ROOT / "experiments").glob("*.yaml")}
    for v in ("standard", "mod", "dtf"):
        assert {f"{v}_scratch.yaml", f"{v}_transfer.yaml"} <= names
    assert "quick.yaml" in names


def test_overrides_apply_with_yaml_types():
    spec = load_spec(ROOT / "experiments/quick.yaml",
                     ["model.type=mod", "training.max_steps=120", "training.optimizer.lr=3e-4",
                      "model.mod_capacity=0.25", "training.eval_causal=false"])
    assert spec.model.type == "mod" and spec.training.max_steps == 120
    assert spec.training.optimizer.lr == 3e-4 and spec.model.overrides_for("mod")["mod_capacity"] == 0.25
    assert spec.training.eval_causal is False
    assert "mod_capacity" not in spec.model.overrides_for("standard")
    again = spec_from_dict(__import__("yaml").safe_load(dump_spec(spec)))
    assert again == spec  # the resolved spec written next to results reloads to the same spec


@pytest.mark.parametrize("raw,match", [
    ({"trainng": {}}, r"unknown key trainng \(did you mean 'training'\?\)"),
    ({"training": {"batch_sise": 4}}, r"unknown key training.batch_sise \(did you mean 'batch_size'\?\)"),
    ({"training": {"optimizer": {"lr": -1}}}, r"training.optimizer.lr: Input should be greater than 0"),
    ({"training": {"max_steps": "ten"}}, r"training.max_steps: .*integer.*'ten'"),
    ({"model": {"type": "moe"}}, r"model.type"),
    ({"model": {"size": "tiny"}}, r"model.size='tiny'"),
    ({"model": {"mod_capacty": 0.2, "type": "mod"}}, r"model.mod_capacty: unknown key \(did you mean 'mod_capacity'"),
    ({"model": {"type": "dtf", "mod_capacity": 0.2}}, r"model.mod_capacity: unknown key: it belongs to \['mod'\]"),
    ({"model": {"type": "mod", "mod_capacity": 1.5}}, r"mod_capacity=1.5: capacity must be a number in \(0, 1\]"),
    ({"training": {"from_scratch": False}}, r"needs model.pretrained"),
    ({"data": {"block_size": 2}}, r"data.block_size"),
])
def test_bad_specs_name_the_key(raw, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(raw, "my.yaml")


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(tmp_path / "list.yaml")
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(ROOT / "experiments/quick.yaml", ["training.max_steps"])
    with pytest.raises(SpecError, match=r"quick.yaml: unknown key training.max_step \(did you mean 'max_steps'"):
        load_spec(ROOT / "experiments/quick.yaml", ["training.max_step=3"])


def test_dense_control_is_standard_at_the_routed_variants_flops():
    from dtlab.models.config import make_config
    from dtlab.models.flops import dense_equivalent, flops_per_token

    spec = load_spec(ROOT / "experiments/quick.yaml")
    assert "dense_control" in spec.variant_list()  # the quick experiment carries its control
    control = spec.for_run("dense_control", 0)
    assert control.model.type == "standard" and control.model.overrides() == {"num_hidden_layers": 2}
    # 2 layers is the depth whose training FLOPs per token are closest to MoD's and DTF's mean
    T, V = spec.data.block_size, spec.data.vocab_size
    target = sum(flops_per_token(make_config(v, "debug", vocab_size=V), T) for v in ("mod", "dtf")) / 2
    dense = make_config("standard", "debug", vocab_size=V)
    gaps = {n: abs(flops_per_token(dense_equivalent(dense, n), T) - target) for n in range(1, 5)}
    assert min(gaps, key=gaps.get) == 2
    assert load_spec(ROOT / "experiments/study_cpu.yaml").for_run("dense_control", 1).model.overrides() == {
        "num_hidden_layers": 6}
    # the LM head costs every depth the same: a Qwen-sized vocabulary does not move the choice
    big = {v: make_config(v, "debug", vocab_size=151_936) for v in ("standard", "mod", "dtf")}
    target = (flops_per_token(big["mod"], T) + flops_per_token(big["dtf"], T)) / 2
    assert min(range(1, 5), key=lambda n: abs(flops_per_token(dense_equivalent(big["standard"], n), T) - target)) == 2


@pytest.mark.parametrize("raw,match", [
    ({"variants": ["standard", "dense_control"]}, r"dense_control matches the training FLOPs of the routed"),
    ({"variants": ["mod", "dense_control"], "training": {"from_scratch": False}, "model": {"pretrained": "x"}},
     r"dense_control trains a shallower Standard from scratch"),
])
def test_dense_control_needs_a_routed_variant_and_a_fresh_start(raw, match):
    with pytest.raises(SpecError, match=match):
        spec_from_dict(raw, "my.yaml")


def test_docs_list_every_spec_key():
    """docs/specs.md is the reference a user reads: every key the spec models accept is on it."""
    from pydantic import BaseModel

    from dtlab.models.config import CONFIG_CLASSES
    from dtlab.trainers.spec import Distribution, Spec

    doc = (ROOT / "docs" / "specs.md").read_text()

    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            nested = [a for a in (getattr(ann, "__args__", None) or (ann,))
                      if isinstance(a, type) and issubclass(a, BaseModel) and a is not Distribution]
            grouped = [sub for sub in nested if sub.__name__ in ("OptimizerSpec", "SchedulerSpec", "AshaSpec")]
            if not grouped:  # a group is listed as its dotted keys (optimizer.lr, ...)
                out.append(prefix + name)
            for sub in nested:
                out += keys(sub, f"{name}." if sub in grouped else "")
        return out

    missing = [k for k in keys(Spec) if f"`{k}`" not in doc]
    missing += [k for c in CONFIG_CLASSES.values() for k in c.field_names() if f"`{k}`" not in doc]
    assert not missing, f"docs/specs.md does not list {sorted(set(missing))}"
