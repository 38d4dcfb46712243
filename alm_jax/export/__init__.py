"""Export of trained runs to Hugging Face formats, and the bundle `alm import` reads back.

    alm export CHECKPOINT_DIR --format llm|peft|qwen2-audio|bundle --out DIR [--step N] [--dtype D]

`source.load_run` rebuilds a run's model from its checkpoint alone (the run config is stored with it);
`writer.ShardedSafetensorsWriter` streams tensors into size-capped safetensors shards + index; one module per
format (`llm`, `peft`, `qwen2_audio`, `bundle`) turns the model into that format's files.
"""
