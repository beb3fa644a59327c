"""The memory processor: the one writer of each shared entity (see ``streamagent.memory``)."""
