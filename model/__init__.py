"""The network, its DeepSpeed training loop and generation. Never imports Prefect."""
