"""The Pallas kernels behind `sparse_attention.attention`, one module per backend, named by lowering and hardware:

  triton      Pallas lowered to Triton, CUDA GPUs sm80+ (docs/triton.md)
  mosaic_gpu  Pallas Mosaic GPU, Hopper sm90+ (docs/mosaic_gpu.md)
  mosaic_tpu  Pallas Mosaic TPU (docs/mosaic_tpu.md)
  common      what they all need: the static argument, softmax constants, the padding custom-VJP wrapper,
              the block-size check and the capability reasons, and the GPU kernels' plan (RowPlan)

Each takes a block layout (`sparse_attention.layout`) and sits beside the pure-jnp `reference`.
"""
