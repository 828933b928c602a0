"""Sampler runtimes: the backends ``--backend`` names (eager, fused, compile, CUDA graphs, ONNX
Runtime, TensorRT), the ``auto`` choice, the ONNX/TensorRT export and caches, TorchScript/AOTInductor export."""
