// The CUDA backend's costs (nvcc; run by bench/gpu_check.sh on a GPU machine):
// - an MLP step (forward + backward, float, TF32 products) through ckpt under `none`, `sqrt_n`
//   and `offload`, against a hand-written cuBLAS step with the same products and fused
//   bias/activation kernels; the hand-written gradients are checked against ckpt's first;
// - one large fused elementwise expression, and softmax and layer norm (a warp per column),
//   against a device-to-device copy of the same bytes;
// - the offload policy's copies alone (device -> pinned host -> device), to say how much of
//   them the step hides.
// Names are <variant>/<layers>/<width>/<batch> (or /<elements>); memory is `peak_bytes`.
#include <ckpt/cuda.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <vector>

using namespace ckpt;
using ckpt::backend::cuda;
using Mat = Eigen::MatrixXf;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "bench_cuda: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

void check(cublasStatus_t e, const char* what) {
  if (e != CUBLAS_STATUS_SUCCESS) {
    std::fprintf(stderr, "bench_cuda: %s: %s\n", what, cublasGetStatusString(e));
    std::exit(1);
  }
}

Mat random_matrix(int rows, int cols, std::uint64_t seed, float scale) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  Mat m(rows, cols);
  for (long i = 0; i < m.size(); ++i) m.data()[i] = d(gen);
  return m;
}

// ------------------------------------------------------------------ the model, twice

/// y_{l+1} = relu(W_l y_l + b_l), loss = mean(y_L^2): weights shared by both versions.
struct weights {
  int layers, width;
  std::vector<Mat> W, b;
  weights(int l, int w) : layers(l), width(w) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(w));
    for (int i = 0; i < l; ++i) {
      W.push_back(random_matrix(w, w, 100 + static_cast<std::uint64_t>(i), bound));
      b.push_back(random_matrix(w, 1, 200 + static_cast<std::uint64_t>(i), bound));
    }
  }
};

/// The input batch lives on the device (a frozen parameter) in both versions: the steps time
/// compute, not the upload of the batch.
struct ckpt_model {
  std::vector<nn::Linear<float, cuda>> net;
  Parameter<float, cuda> input;
  ckpt_model(const weights& w, const Mat& x) : input(x, true) {
    for (int i = 0; i < w.layers; ++i) net.emplace_back(w.W[static_cast<std::size_t>(i)], w.b[static_cast<std::size_t>(i)]);
  }
  template <class P>
  float step(Tape<float, cuda>& t) {
    t.reset();
    for (auto& l : net) l.zero_grad();
    auto h = t.param(input);
    auto y = sequential<P>(net.size(), [this](std::size_t i, const Var<float, cuda>& v) -> Var<float, cuda> { return relu(net[i](v)); }, h);
    auto loss = mean(square(y));
    t.backward(loss);
    return loss.item();
  }
};

__global__ void bias_relu(float* y, const float* b, int rows, long n) {
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x) {
    const float v = y[i] + b[i % rows];
    y[i] = v > 0.f ? v : 0.f;
  }
}
__global__ void relu_back(float* dz, const float* y, long n) {  // dz *= (y > 0), in place
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x)
    dz[i] = y[i] > 0.f ? dz[i] : 0.f;
}
__global__ void scaled(float* g, const float* y, float s, long n) {
  for (long i = blockIdx.x * static_cast<long>(blockDim.x) + threadIdx.x; i < n; i += static_cast<long>(gridDim.x) * blockDim.x) g[i] = s * y[i];
}

/// The same step written by hand: cuBLAS products, one fused kernel per bias + relu, every
/// activation kept (what `none` keeps), nothing recomputed.
struct hand_model {
  int layers, width, batch;
  float *W, *b, *dW, *db, *act, *g0, *g1, *ones, *sum_sq;
  hand_model(const weights& w, const Mat& x) : layers(w.layers), width(w.width), batch(static_cast<int>(x.cols())) {
    const std::size_t ww = static_cast<std::size_t>(width) * width, wb = static_cast<std::size_t>(width) * batch;
    check(cudaMalloc(&W, sizeof(float) * ww * layers), "cudaMalloc");
    check(cudaMalloc(&dW, sizeof(float) * ww * layers), "cudaMalloc");
    check(cudaMalloc(&b, sizeof(float) * width * layers), "cudaMalloc");
    check(cudaMalloc(&db, sizeof(float) * width * layers), "cudaMalloc");
    check(cudaMalloc(&act, sizeof(float) * wb * (layers + 1)), "cudaMalloc");
    check(cudaMalloc(&g0, sizeof(float) * wb), "cudaMalloc");
    check(cudaMalloc(&g1, sizeof(float) * wb), "cudaMalloc");
    check(cudaMalloc(&ones, sizeof(float) * batch), "cudaMalloc");
    check(cudaMalloc(&sum_sq, sizeof(float)), "cudaMalloc");
    const std::vector<float> host_ones(static_cast<std::size_t>(batch), 1.f);
    check(cudaMemcpy(ones, host_ones.data(), sizeof(float) * batch, cudaMemcpyHostToDevice), "upload");
    check(cudaMemcpy(act, x.data(), sizeof(float) * wb, cudaMemcpyHostToDevice), "upload");  // act[0]: the input
    for (int l = 0; l < layers; ++l) {
      check(cudaMemcpy(W + ww * l, w.W[static_cast<std::size_t>(l)].data(), sizeof(float) * ww, cudaMemcpyHostToDevice), "upload");
      check(cudaMemcpy(b + static_cast<std::size_t>(width) * l, w.b[static_cast<std::size_t>(l)].data(), sizeof(float) * width,
                       cudaMemcpyHostToDevice), "upload");
    }
    check(cudaDeviceSynchronize(), "upload");  // plain cudaMemcpy is not ordered with the compute stream
  }
  ~hand_model() {
    for (float* p : {W, b, dW, db, act, g0, g1, ones, sum_sq}) cudaFree(p);
  }
  /// The layers' outputs and two gradient buffers (the input, like ckpt's, is not counted).
  std::size_t activation_bytes() const { return sizeof(float) * static_cast<std::size_t>(width) * batch * (layers + 2); }

  float step() {
    cudaStream_t s = cuda::stream();
    cublasHandle_t h = cuda::context().blas();
    const long n = static_cast<long>(width) * batch;
    const std::size_t ww = static_cast<std::size_t>(width) * width;
    const unsigned grid = static_cast<unsigned>(std::min<long>((n + 255) / 256, 65535));
    check(cudaMemsetAsync(dW, 0, sizeof(float) * ww * layers, s), "memset");
    check(cudaMemsetAsync(db, 0, sizeof(float) * width * layers, s), "memset");
    const float one = 1.f, zero = 0.f;
    for (int l = 0; l < layers; ++l) {
      float* in = act + n * l;
      float* out = act + n * (l + 1);
      cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, width, batch, width, &one, W + ww * l, width, in, width, &zero, out, width);
      bias_relu<<<grid, 256, 0, s>>>(out, b + static_cast<long>(width) * l, width, n);
    }
    float* y = act + n * layers;
    // The loss stays on the device until the step's end (read once there, as ckpt's is).
    check(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_DEVICE), "pointer mode");
    cublasSdot(h, static_cast<int>(n), y, 1, y, 1, sum_sq);
    check(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST), "pointer mode");
    scaled<<<grid, 256, 0, s>>>(g0, y, 2.f / static_cast<float>(n), n);
    for (int l = layers - 1; l >= 0; --l) {
      float* in = act + n * l;
      relu_back<<<grid, 256, 0, s>>>(g0, act + n * (l + 1), n);
      // db += dz 1: the bias gradient as a matrix-vector product
      cublasSgemv(h, CUBLAS_OP_N, width, batch, &one, g0, width, ones, 1, &one, db + static_cast<long>(width) * l, 1);
      cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_T, width, width, batch, &one, g0, width, in, width, &one, dW + ww * l, width);
      if (l > 0) cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, width, batch, width, &one, W + ww * l, width, g0, width, &zero, g1, width);
      std::swap(g0, g1);
    }
    float loss = 0;
    check(cudaMemcpyAsync(&loss, sum_sq, sizeof(float), cudaMemcpyDeviceToHost, s), "download");
    check(cudaStreamSynchronize(s), "sync");
    return loss / static_cast<float>(n);
  }
  Mat grad_W(int l) const {
    Mat m(width, width);
    check(cudaMemcpy(m.data(), dW + static_cast<std::size_t>(width) * width * l, sizeof(float) * m.size(), cudaMemcpyDeviceToHost), "download");
    return m;
  }
  Mat grad_b(int l) const {
    Mat m(width, 1);
    check(cudaMemcpy(m.data(), db + static_cast<std::size_t>(width) * l, sizeof(float) * m.size(), cudaMemcpyDeviceToHost), "download");
    return m;
  }
};

/// Whether the hand-written step's gradients matched ckpt's (checked once, before timing): a
/// mismatch is reported in the table rather than ending the run, whose figures the one GPU call
/// cannot afford to lose.
int hand_matches_ckpt = -1;  ///< 1 matched, 0 differed, -1 the check itself failed

/// Before anything is timed: the hand-written gradients are ckpt's (small model, no TF32).
void check_hand_against_ckpt() {
  cuda::set_tf32(false);
  const weights w(4, 96);
  const Mat x = random_matrix(96, 80, 7, 1.0f);
  ckpt_model m(w, x);
  hand_model hm(w, x);
  Tape<float, cuda> t;
  const float la = m.step<policy::none>(t), lh = hm.step();
  cuda::synchronize();
  bool ok = std::abs(la - lh) <= 1e-5f * std::max(1.f, std::abs(la));
  auto close = [](const Mat& a, const Mat& h) { return (a - h).cwiseAbs().maxCoeff() <= 1e-4f * std::max(1e-30f, h.cwiseAbs().maxCoeff()); };
  for (int l = 0; l < w.layers && ok; ++l) {
    auto& layer = m.net[static_cast<std::size_t>(l)];
    ok = close(layer.weight().grad_to_host(), hm.grad_W(l)) && close(layer.bias().grad_to_host(), hm.grad_b(l));
  }
  hand_matches_ckpt = ok ? 1 : 0;
  if (!ok) std::fprintf(stderr, "bench_cuda: WARNING: the hand-written step's gradients differ from ckpt's (timed all the same)\n");
}

// ------------------------------------------------------------------ benchmarks

template <class P>
void BM_mlp(benchmark::State& state) {
  cuda::set_tf32(true);
  const int layers = static_cast<int>(state.range(0)), width = static_cast<int>(state.range(1)), batch = static_cast<int>(state.range(2));
  const weights w(layers, width);
  const Mat x = random_matrix(width, batch, 3, 1.0f);
  ckpt_model m(w, x);
  Tape<float, cuda> t;
  m.step<P>(t);  // warm: the pool fills
  std::size_t peak = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(m.step<P>(t));
    cuda::synchronize();
    peak = std::max(peak, t.peak_bytes());
  }
  state.counters["peak_bytes"] = static_cast<double>(peak);
  state.counters["offloaded_bytes"] = static_cast<double>(t.memory().host_peak_bytes);
  state.counters["tflops"] = benchmark::Counter(6.0 * layers * double(width) * width * batch * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_mlp_hand(benchmark::State& state) {
  cuda::set_tf32(true);
  const int layers = static_cast<int>(state.range(0)), width = static_cast<int>(state.range(1)), batch = static_cast<int>(state.range(2));
  const weights w(layers, width);
  const Mat x = random_matrix(width, batch, 3, 1.0f);
  hand_model hm(w, x);
  hm.step();
  for (auto _ : state) {
    benchmark::DoNotOptimize(hm.step());
    cuda::synchronize();
  }
  state.counters["peak_bytes"] = static_cast<double>(hm.activation_bytes());
  state.counters["matches_ckpt"] = hand_matches_ckpt;
  state.counters["tflops"] = benchmark::Counter(6.0 * layers * double(width) * width * batch * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
}

/// Each iteration's time on the device: f() is queued between two events.
template <class F>
void time_on_device(benchmark::State& state, F f) {
  cudaEvent_t e0, e1;
  check(cudaEventCreate(&e0), "event");
  check(cudaEventCreate(&e1), "event");
  for (auto _ : state) {
    check(cudaEventRecord(e0, cuda::stream()), "event");
    f();
    check(cudaEventRecord(e1, cuda::stream()), "event");
    check(cudaEventSynchronize(e1), "event");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, e0, e1), "event");
    state.SetIterationTime(ms * 1e-3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

/// y = a * sigmoid(b) + 0.5 * c: reads three arrays, writes one, in one fused kernel.
void BM_elementwise(benchmark::State& state) {
  const int rows = static_cast<int>(state.range(0)), cols = static_cast<int>(state.range(1) / rows);
  Tape<float, cuda> t;
  const Mat host = random_matrix(rows, cols, 1, 1.0f);
  auto a = t.constant(host), b = t.constant(host), c = t.constant(host);
  const auto mark = t.position();
  time_on_device(state, [&] {
    t.reset_to(mark);
    benchmark::DoNotOptimize(eval(a * sigmoid(b) + 0.5f * c));
  });
  state.SetBytesProcessed(state.iterations() * 4 * static_cast<std::int64_t>(sizeof(float)) * rows * cols);
}

/// A row-wise op's forward (a warp per column) over 4096 x n / 4096: bytes counted as one read
/// of the input and one write of the output, to compare with the copy.
enum class rowwise_op { softmax, layer_norm };
template <rowwise_op Op>
void BM_rowwise(benchmark::State& state) {
  const int rows = static_cast<int>(state.range(0)), cols = static_cast<int>(state.range(1) / rows);
  Tape<float, cuda> t;
  auto a = t.constant(random_matrix(rows, cols, 1, 3.0f));
  auto gain = t.constant(Mat::Ones(rows, 1)), bias = t.constant(Mat::Zero(rows, 1));
  const auto mark = t.position();
  time_on_device(state, [&] {
    t.reset_to(mark);
    if constexpr (Op == rowwise_op::softmax)
      benchmark::DoNotOptimize(softmax(a));
    else
      benchmark::DoNotOptimize(layer_norm(a, gain, bias));
  });
  state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(sizeof(float)) * rows * cols);
}

/// A device-to-device copy of the same bytes (2 n read, 2 n written).
void BM_copy(benchmark::State& state) {
  const long n = state.range(0);
  float *src, *dst;
  check(cudaMalloc(&src, sizeof(float) * 2 * n), "cudaMalloc");
  check(cudaMalloc(&dst, sizeof(float) * 2 * n), "cudaMalloc");
  time_on_device(state, [&] {
    check(cudaMemcpyAsync(dst, src, sizeof(float) * 2 * n, cudaMemcpyDeviceToDevice, cuda::stream()), "copy");
  });
  state.SetBytesProcessed(state.iterations() * 4 * static_cast<std::int64_t>(sizeof(float)) * n);
  cudaFree(src);
  cudaFree(dst);
}

/// What offload moves, alone: `segments` boundaries of width x batch floats to pinned host
/// memory and back, on the copy stream.
void BM_offload_copies(benchmark::State& state) {
  const int segments = static_cast<int>(state.range(0)), width = static_cast<int>(state.range(1)), batch = static_cast<int>(state.range(2));
  const std::size_t bytes = sizeof(float) * static_cast<std::size_t>(width) * batch;
  void *dev, *host;
  check(cudaMalloc(&dev, bytes), "cudaMalloc");
  check(cudaMallocHost(&host, bytes), "cudaMallocHost");
  cudaStream_t s = cuda::context().copy_stream();
  for (auto _ : state) {
    for (int k = 0; k < segments; ++k) check(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, s), "d2h");
    for (int k = 0; k < segments; ++k) check(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, s), "h2d");
    check(cudaStreamSynchronize(s), "sync");
  }
  state.SetBytesProcessed(state.iterations() * 2 * static_cast<std::int64_t>(bytes) * segments);
  cudaFreeHost(host);
  cudaFree(dev);
}

/// A benchmark whose body throws (a ckpt::error, a cuda_error) is reported as failed and the run
/// goes on to the next, instead of ending in std::terminate with the rest unmeasured.
template <void (*Body)(benchmark::State&)>
void guarded(benchmark::State& state) {
  try {
    Body(state);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (const std::string why = cuda::unavailable_reason(); !why.empty()) {
    std::printf("bench_cuda: no CUDA device here (%s); nothing measured\n", why.c_str());
    return 0;
  }
  try {
    check_hand_against_ckpt();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda: WARNING: the check of the hand-written step failed: %s\n", e.what());
  }
  const int L = 16, W = 4096, N = 4096;
  benchmark::RegisterBenchmark("cublas_hand", guarded<BM_mlp_hand>)->Args({L, W, N})->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("none", guarded<BM_mlp<policy::none>>)->Args({L, W, N})->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("sqrt_n", guarded<BM_mlp<policy::sqrt_n>>)->Args({L, W, N})->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("offload", guarded<BM_mlp<policy::offload<>>>)->Args({L, W, N})->Unit(benchmark::kMillisecond)->UseRealTime();
  // sqrt_n over 16 layers: segments of 4, three checkpointed, so two boundaries offloaded.
  benchmark::RegisterBenchmark("offload_copies", guarded<BM_offload_copies>)->Args({2, W, N})->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("elementwise", guarded<BM_elementwise>)->Args({4096, 1L << 26})->Unit(benchmark::kMillisecond)->UseManualTime();
  // Row-wise ops take a warp per column: 4096 features is the model's case; 16 features leaves
  // half of each warp idle, and 65536 features in 1024 columns gives the GPU 1024 warps only.
  benchmark::RegisterBenchmark("softmax", guarded<BM_rowwise<rowwise_op::softmax>>)->Args({4096, 1L << 26})->Unit(benchmark::kMillisecond)->UseManualTime();
  benchmark::RegisterBenchmark("layer_norm", guarded<BM_rowwise<rowwise_op::layer_norm>>)->Args({4096, 1L << 26})->Unit(benchmark::kMillisecond)->UseManualTime();
  benchmark::RegisterBenchmark("softmax_short", guarded<BM_rowwise<rowwise_op::softmax>>)->Args({16, 1L << 26})->Unit(benchmark::kMillisecond)->UseManualTime();
  benchmark::RegisterBenchmark("softmax_long", guarded<BM_rowwise<rowwise_op::softmax>>)->Args({1L << 16, 1L << 26})->Unit(benchmark::kMillisecond)->UseManualTime();
  benchmark::RegisterBenchmark("copy", guarded<BM_copy>)->Arg(1L << 26)->Unit(benchmark::kMillisecond)->UseManualTime();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
