// bench_lora: what a training step of a LoRA fine-tune costs against training every weight, with
// and without checkpointing, and what keeping the adapter's A x saves.
//
// The model: a stack of `blocks` residual MLP blocks h <- h + fc2(relu(fc1(h))), fc1 and fc2
// both width x width with a bias; the input is a constant (width x batch), the loss mean(h^2).
// relu, not gelu: the FLOP theory below counts the products only, and relu stays under 1.5% of
// a profile, where the products (kernel and packing) take ~80%. (gelu took about 40% of a `lora`
// step, perf, 16/512/128/16, when it called libm's scalar tanhf per element; expr/math.hpp's
// tanh now vectorises, about 17x faster in bench_tape's act_gelu rows, but it is still an
// activation that the theory would have to model.)
// Variants (named <variant>/<blocks>/<width>/<batch>/<rank>):
//   full              every W and b trainable (nn::Linear), no checkpointing: the baseline;
//   lora              W and b frozen, rank-r adapters (nn::LoRALinear), no checkpointing;
//   lora_ckpt         as lora, each block one checkpoint(): the re-trace redoes W x and B u,
//                     never A x (kept through ckpt::keep inside nn::LoRALinear);
//   lora_ckpt_unkept  as lora_ckpt, with the layer written as a composition of core ops,
//                     matmul(W, x) + s * matmul(B, matmul(A, x)) + b, nothing kept: the re-trace
//                     redoes A x too (what Unsloth's fused LoRA does in its backward);
//   lora_ckpt_unfused the same composition with keep(matmul(A, x)): separates what keeping A x
//                     saves (against lora_ckpt_unkept) from what the fused entry saves (against
//                     lora_ckpt).
// Before timing, once per size: lora and lora_ckpt give bit-for-bit the same gradients, and so do
// the composition with and without checkpointing (kept or not); and at B = 0, where a LoRA layer
// computes exactly the full layer's output, the AD gradient of B equals the hand-derived
// s dW_full A^T (dB = s g (A x)^T = s (g x^T) A^T) from the full model's dW.
//
// Counters: peak_bytes (the tape's peak in a step: activations, adjoints, kept values),
// grad_bytes (see below), gemms (products run per step, forward,
// re-trace and reverse), flops (the products' FLOPs per step, from their sizes; checked against
// the tape's product count), flop_ratio (flops against `full`: the time ratio to expect where
// products dominate) and flop_rate (flops per second of step time).
//
// FLOP theory, per linear layer, F = 2 width^2 batch (one full-size product) and
// R = 2 rank width batch (one adapter product):
//   full              3F      (W x; dW = g x^T, dx = W^T g)
//   lora              2F + 6R (W x, A x, B u; W^T g, s B^T g, s g u^T, du x^T, A^T du; no dW)
//   lora_ckpt         3F + 7R (+ W x, B u in the re-trace)
//   lora_ckpt_unkept  3F + 8R (+ W x, A x, B u)
// minus, for the first layer (its input is a constant), the products for dx: F (full) or F + R
// (the others). At (16, 512, 128, 16), R = F / 32: full 95F, lora 69.0F (0.726), lora_ckpt
// 102.0F (1.073), lora_ckpt_unkept 103.0F (1.084).
//
// Memory outside the tape: grad_bytes counts the trainable parameters' gradient buffers (an
// optimiser's state is a multiple of it): every W and b for `full`, only A and B for LoRA.
#include <ckpt/ckpt.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

using namespace ckpt;
using Mat = Eigen::MatrixXf;
using V = Var<float>;
using Lora = nn::LoRALinear<float>;

namespace {

enum class variant { full, lora, lora_ckpt, lora_ckpt_unkept, lora_ckpt_unfused };

const char* name_of(variant v) {
  switch (v) {
    case variant::full: return "full";
    case variant::lora: return "lora";
    case variant::lora_ckpt: return "lora_ckpt";
    case variant::lora_ckpt_unkept: return "lora_ckpt_unkept";
    case variant::lora_ckpt_unfused: return "lora_ckpt_unfused";
  }
  return "?";
}

struct config {
  int blocks, width, batch, rank;
  auto key() const { return std::tuple{blocks, width, batch, rank}; }
};

/// The layer as a composition of core ops; `keep_u` keeps A x through checkpoints.
V unfused(Lora& l, const V& x, bool keep_u) {
  const V u = matmul(l.A(), x);
  if (keep_u) keep(u);
  return matmul(l.weight(), x) + l.scale() * matmul(l.B_matrix(), u) + l.bias();
}

struct model {
  config c;
  std::vector<nn::Linear<float>> full;  // fc1, fc2 of block 0, fc1, fc2 of block 1, ...
  std::vector<Lora> lora;               // the same weights, frozen, with adapters
  Mat x;

  explicit model(config cfg, bool zero_B = false) : c(cfg) {
    const int n = 2 * c.blocks;
    full.reserve(static_cast<std::size_t>(n));
    lora.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      full.emplace_back(c.width, c.width, 1000 + static_cast<std::uint64_t>(i));
      lora.emplace_back(full.back(), c.rank, 2.0 * c.rank, 2000 + static_cast<std::uint64_t>(i));
      // B = 0 (the initialisation) would make dA zero; a fine-tune in progress has B != 0.
      if (!zero_B) lora.back().B_matrix().value() = Mat::Random(c.width, c.rank) * 0.05f;
    }
    std::srand(7);
    x = Mat::Random(c.width, c.batch);
  }

  V block(variant v, int i, const V& h) {
    const std::size_t a = 2 * static_cast<std::size_t>(i), b = a + 1;
    switch (v) {
      case variant::full: return h + full[b](relu(full[a](h)));
      case variant::lora:
      case variant::lora_ckpt: return h + lora[b](relu(lora[a](h)));
      case variant::lora_ckpt_unkept: return h + unfused(lora[b], relu(unfused(lora[a], h, false)), false);
      case variant::lora_ckpt_unfused: return h + unfused(lora[b], relu(unfused(lora[a], h, true)), true);
    }
    return h;
  }

  void zero_grad() {
    for (auto& l : full) l.zero_grad();
    for (auto& l : lora) l.zero_grad();
  }
};

struct step_stats {
  std::size_t peak = 0, gemms = 0;
  float loss = 0;
};

/// One training step (forward and backward; the optimiser's update is not timed).
step_stats train_step(model& m, variant v, Tape<float>& tape, bool checkpointed) {
  tape.reset();
  m.zero_grad();
  V h = tape.constant(m.x);
  for (int i = 0; i < m.c.blocks; ++i)
    h = checkpointed ? checkpoint("block", [&m, v, i](const V& x) { return m.block(v, i, x); }, h) : m.block(v, i, h);
  const V loss = mean(square(h));
  tape.backward(loss);
  return {tape.peak_bytes(), tape.counters().gemms, loss.item()};
}

bool checkpointed(variant v) { return v != variant::full && v != variant::lora; }

/// GEMM FLOPs and count of one step, from the products' sizes (see the top of the file).
struct theory {
  double flops = 0;
  std::size_t gemms = 0;
};
theory flops_of(const config& c, variant v) {
  const double F = 2.0 * c.width * c.width * c.batch, R = 2.0 * c.rank * c.width * c.batch;
  theory t;
  for (int layer = 0; layer < 2 * c.blocks; ++layer) {
    const bool first = layer == 0;  // its input is a constant: no dx
    auto add = [&t](double f, int count) {
      t.flops += f * count;
      t.gemms += static_cast<std::size_t>(count);
    };
    if (v == variant::full) {
      add(F, first ? 2 : 3);
      continue;
    }
    add(F, first ? 1 : 2);  // W x; W^T g
    add(R, first ? 5 : 6);  // A x, B u; s B^T g, s g u^T, du x^T; A^T du
    if (v == variant::lora_ckpt || v == variant::lora_ckpt_unfused) {
      add(F, 1);  // re-trace: W x
      add(R, 1);  // and B u; A x is kept
    } else if (v == variant::lora_ckpt_unkept) {
      add(F, 1);
      add(R, 2);  // B u and A x
    }
  }
  return t;
}

std::vector<Mat> adapter_grads(model& m) {
  std::vector<Mat> g;
  for (auto& l : m.lora) {
    g.push_back(l.A().grad());
    g.push_back(l.B_matrix().grad());
  }
  return g;
}

bool same_bits(const std::vector<Mat>& a, const std::vector<Mat>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), sizeof(float) * static_cast<std::size_t>(a[i].size())) != 0)
      return false;
  return true;
}

[[noreturn]] void fail(const config& c, const char* what) {
  std::fprintf(stderr, "bench_lora %d/%d/%d/%d: %s\n", c.blocks, c.width, c.batch, c.rank, what);
  std::abort();
}

/// The checks of the top of the file; aborts on a mismatch.
void check(model& m) {
  const config& c = m.c;
  Tape<float> tape;
  auto grads_of = [&](variant v, bool ck) {
    train_step(m, v, tape, ck);
    return adapter_grads(m);
  };
  const auto lora = grads_of(variant::lora, false);
  if (!same_bits(lora, grads_of(variant::lora_ckpt, true))) fail(c, "lora_ckpt gradients differ from lora");
  for (const auto& g : lora)
    if (!(g.cwiseAbs().maxCoeff() > 0.0f)) fail(c, "an adapter gradient is zero; the comparison would prove nothing");
  const auto composed = grads_of(variant::lora_ckpt_unkept, false);
  if (!same_bits(composed, grads_of(variant::lora_ckpt_unkept, true))) fail(c, "the unkept composition's gradients change under checkpoint()");
  if (!same_bits(composed, grads_of(variant::lora_ckpt_unfused, true))) fail(c, "keeping A x changes the composition's gradients");

  // At B = 0 the LoRA model computes the full model's activations bit for bit, so every layer
  // sees the same output gradient g, and dB = s g (A x)^T = s dW A^T.
  model z(c, true);
  const step_stats sf = train_step(z, variant::full, tape, false);
  std::vector<Mat> dW;
  for (auto& l : z.full) dW.push_back(l.weight().grad());
  const step_stats sl = train_step(z, variant::lora, tape, false);
  if (sf.loss != sl.loss) fail(c, "at B = 0 the LoRA model's loss differs from the full model's");
  for (std::size_t i = 0; i < z.lora.size(); ++i) {
    Lora& l = z.lora[i];
    const Eigen::MatrixXd expected = static_cast<double>(l.scale()) * dW[i].cast<double>() * l.A().value().cast<double>().transpose();
    const Eigen::MatrixXd got = l.B_matrix().grad().cast<double>();
    const double err = (got - expected).cwiseAbs().maxCoeff(), scale = expected.cwiseAbs().maxCoeff();
    if (!(scale > 0) || err > 1e-4 * scale) fail(c, "dB differs from s dW_full A^T");
  }
}

std::map<std::tuple<int, int, int, int>, std::unique_ptr<model>>& models() {
  static std::map<std::tuple<int, int, int, int>, std::unique_ptr<model>> m;
  return m;
}

/// The model of a size, built and checked once (repetitions reuse it).
model& model_for(const config& c) {
  auto& slot = models()[c.key()];
  if (!slot) {
    slot = std::make_unique<model>(c);
    check(*slot);
  }
  return *slot;
}

std::size_t grad_bytes(model& m, variant v) {
  std::size_t n = 0;
  if (v == variant::full) {
    for (auto& l : m.full) n += static_cast<std::size_t>(l.weight().dims().size() + l.bias().dims().size());
  } else {
    for (auto& l : m.lora) n += static_cast<std::size_t>(l.A().dims().size() + l.B_matrix().dims().size());
  }
  return n * sizeof(float);
}

void bm_step(benchmark::State& state, variant v, config c) {
  model& m = model_for(c);
  const theory th = flops_of(c, v), full = flops_of(c, variant::full);
  Tape<float> tape;
  step_stats s = train_step(m, v, tape, checkpointed(v));  // warms the buffer pool
  if (s.gemms != th.gemms) fail(c, "the tape ran another number of products than the FLOP count assumes");
  for (auto _ : state) s = train_step(m, v, tape, checkpointed(v));
  state.counters["peak_bytes"] = static_cast<double>(s.peak);
  state.counters["gemms"] = static_cast<double>(s.gemms);
  state.counters["grad_bytes"] = static_cast<double>(grad_bytes(m, v));
  state.counters["flops"] = th.flops;
  state.counters["flop_ratio"] = th.flops / full.flops;
  state.counters["flop_rate"] = benchmark::Counter(th.flops, benchmark::Counter::kIsIterationInvariantRate);
}

const bool registered = [] {
  benchmark::AddCustomContext("ckpt_gemm", backend::cpu::gemm_engine());
  const config sizes[] = {{16, 512, 128, 16}, {16, 512, 128, 64}, {8, 1024, 64, 16}};
  for (const auto& c : sizes)
    for (variant v : {variant::full, variant::lora, variant::lora_ckpt, variant::lora_ckpt_unkept, variant::lora_ckpt_unfused}) {
      const std::string name = std::string(name_of(v)) + "/" + std::to_string(c.blocks) + "/" + std::to_string(c.width) + "/" +
                               std::to_string(c.batch) + "/" + std::to_string(c.rank);
      benchmark::RegisterBenchmark(name.c_str(), [v, c](benchmark::State& st) { bm_step(st, v, c); })->Unit(benchmark::kMillisecond);
    }
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
