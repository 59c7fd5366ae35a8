"""Many nodes, one cluster config: etcd as the config source, node registration, fleet status."""
