"""dtlab dashboards: report layout and the Grafana dashboard definition."""
