"""Cluster: the `music2vec` command line, distributed environments, submitit executors."""
