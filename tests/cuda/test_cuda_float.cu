// Every op on CUDA against the CPU in float (see test_cuda_ops.inl).
#define CKPT_TEST_SCALAR float
#include "cuda/test_cuda_ops.inl"
