"""engram plugin for continuous audio latents (Mimi `z_dyn`): data, dynamics heads
(Gaussian MLP, vMF direction x log-normal magnitude), memories, rollout objectives and
metrics. Components are registered in `engram_audio_mimi.plugin`."""

__version__ = "0.1.0"
