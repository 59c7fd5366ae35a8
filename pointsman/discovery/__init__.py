"""Backends found at run time (DNS, Kubernetes EndpointSlices, etcd members) and the one path
every config change takes to the runtime (`composer.Composer`)."""
