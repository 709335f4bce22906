// Every op on CUDA against the CPU in double (see test_cuda_ops.inl).
#define CKPT_TEST_SCALAR double
#include "cuda/test_cuda_ops.inl"
