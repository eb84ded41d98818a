"""ehrfm.apps: the top layer -- what the `ehrfm` command runs besides the stages' own subcommands: the demo,
the ablation and study runners (and the pipeline steps they share), the benchmark harness and the prepared
GPU check. Nothing below this layer imports it (``tests/test_layers.py``)."""
