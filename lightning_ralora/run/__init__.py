"""The run machinery the commands share: compose and validate a config, name the run, build the trainer, record the
result, survive the cluster (signals, run directories, secrets)."""
