"""The `dtlab` command and `dtlab ls`."""
