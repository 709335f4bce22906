// nn::LoRALinear and nn::Linear: gradients against finite differences (double) and against an
// unfused composition of core ops, under checkpoint() and every policy (bit for bit equal to
// policy::none, with the adapter's A x computed once per step where the policy allows it), no
// gradient buffer ever for the frozen W, merge()/unmerge(), and shape errors.
#include "support/gradcheck.hpp"

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

using namespace ckpt;
using namespace ckpt::test;

namespace {

using V = Var<double>;
using Lora = nn::LoRALinear<double>;

/// A LoRA layer with a non-zero B: with B = 0 (the initialisation) dA and the adapter's share of
/// dx are zero, and a gradient check would prove nothing about them.
Lora make_lora(int out, int in, int rank, double alpha, bool bias, double dropout, std::uint64_t seed = 1) {
  const Mat W = random_matrix(out, in, seed);
  Lora l = bias ? Lora(W, random_matrix(out, 1, seed + 1), rank, alpha, seed + 2, dropout) : Lora(W, rank, alpha, seed + 2, dropout);
  l.B_matrix().value() = random_matrix(out, rank, seed + 3);
  return l;
}

// ------------------------------------------------------------------ finite differences

/// Gradients of sum(l(x) .* weights) with respect to x, A and B against central differences.
/// The dropout mask is a function of (tape seed, step, op number), the same on every fresh
/// tape, so the loss is a smooth function of x, A and B for a fixed mask.
void check_lora_fd(bool bias, double dropout) {
  Lora l = make_lora(4, 3, 2, 3.0, bias, dropout);
  const Mat x0 = random_matrix(3, 5, 20), weights = random_matrix(4, 5, 21, 0.5, 1.5);
  const Mat A0 = l.A().value(), B0 = l.B_matrix().value();
  auto run = [&](const Mat& x, const Mat& A, const Mat& B, Mat* dx) {
    l.A().value() = A;
    l.B_matrix().value() = B;
    l.zero_grad();
    Tape<double> tape;
    const V xv = tape.variable(x);
    V loss = sum(l(xv) * tape.constant(weights));
    const double value = loss.item();
    if (dx) {
      tape.backward(loss);
      *dx = tape.grad(xv);
    }
    return value;
  };
  Mat dx;
  run(x0, A0, B0, &dx);
  const Mat dA = l.A().grad(), dB = l.B_matrix().grad();
  const auto numeric = numeric_grad([&](const std::vector<Mat>& in) { return run(in[0], in[1], in[2], nullptr); }, {x0, A0, B0});
  expect_close(dx, numeric[0], 1e-7, "dx");
  expect_close(dA, numeric[1], 1e-7, "dA");
  expect_close(dB, numeric[2], 1e-7, "dB");
  CHECK(dA.cwiseAbs().maxCoeff() > 0.0);
  CHECK(dB.cwiseAbs().maxCoeff() > 0.0);
  CHECK(l.weight().grad_data() == nullptr);
}

TEST_CASE("LoRALinear: gradients of x, A and B against finite differences") {
  SUBCASE("no bias, no dropout") { check_lora_fd(false, 0.0); }
  SUBCASE("bias") { check_lora_fd(true, 0.0); }
  SUBCASE("adapter dropout") { check_lora_fd(false, 0.4); }
  SUBCASE("bias and adapter dropout") { check_lora_fd(true, 0.4); }
}

TEST_CASE("LoRALinear: the forward value is W x + (alpha / r) B (A x) + b") {
  Lora l = make_lora(4, 3, 2, 3.0, true, 0.0);
  const Mat x = random_matrix(3, 5, 30);
  Tape<double> tape;
  const V y = l(tape.constant(x));
  const Mat expected = (l.weight().value() * x + 1.5 * l.B_matrix().value() * (l.A().value() * x)).colwise() +
                       Eigen::VectorXd(l.bias().value().col(0));
  CHECK(l.scale() == 1.5);
  CHECK(close_rel(Mat(y.value()), expected, 1e-14));
}

TEST_CASE("LoRALinear: dropout acts on the adapter's input only") {
  Lora plain = make_lora(4, 3, 2, 3.0, true, 0.0);
  Lora dropped = make_lora(4, 3, 2, 3.0, true, 0.5);
  const Mat x = random_matrix(3, 64, 31);
  Tape<double> t1, t2;
  const Mat y1 = plain(t1.constant(x)).value(), y2 = dropped(t2.constant(x)).value();
  CHECK_FALSE(same_bits(y1, y2));
  // With B = 0 the adapter adds exact zeros, dropout or not: the base path never sees dropout.
  plain.B_matrix().value().setZero();
  dropped.B_matrix().value().setZero();
  Tape<double> t3, t4;
  CHECK(same_bits(Mat(plain(t3.constant(x)).value()), Mat(dropped(t4.constant(x)).value())));
}

// ------------------------------------------------------------------ against core ops

struct lora_grads {
  Mat y, dx, dA, dB;
  op_counters counters;
  std::size_t peak;
};

/// The fused layer on a fresh tape: y, and the gradients of sum(y .* weights).
lora_grads fused_run(Lora& l, const Mat& x, const Mat& weights) {
  l.zero_grad();
  Tape<double> tape;
  const V xv = tape.variable(x);
  const V y = l(xv);
  tape.retain(y);
  tape.backward(sum(y * tape.constant(weights)));
  return {y.value(), tape.grad(xv), l.A().grad(), l.B_matrix().grad(), tape.counters(), tape.peak_bytes()};
}

/// The same layer written with core ops, matmul(W, x) + s * matmul(B, matmul(A, x)) + b, on
/// copies of the layer's parameters (W and b frozen, A and B trainable).
lora_grads unfused_run(Lora& l, bool bias, double p, const Mat& x, const Mat& weights) {
  Parameter<double> W(Mat(l.weight().value()), true), b(Mat(l.bias().value()), true);
  Parameter<double> A(Mat(l.A().value())), B(Mat(l.B_matrix().value()));
  Tape<double> tape;
  const V xv = tape.variable(x);
  const V xa = p > 0 ? V(dropout(xv, p)) : xv;  // op number 0 of the tape's RNG, as in the fused layer
  const V wx = matmul(W, xv);
  const V bax = matmul(B, matmul(A, xa));
  const V y = bias ? V(wx + l.scale() * bax + b) : V(wx + l.scale() * bax);
  tape.retain(y);
  tape.backward(sum(y * tape.constant(weights)));
  return {y.value(), tape.grad(xv), A.grad(), B.grad(), tape.counters(), tape.peak_bytes()};
}

}  // namespace

// Same arithmetic or not? The fused layer computes y = W x (GEMM, beta 0), then y += s (B u) as
// one GEMM with alpha = s, then adds b; its reverse computes s B^T g and s g u^T as GEMMs with
// alpha = s and adds W^T g and A^T du into dx in that order. The composition computes B u with
// alpha = 1 and multiplies by s in the elementwise node (forward), and s g in that node's reverse
// before the GEMMs B^T (s g) and (s g) u^T; dx receives A^T du first, then W^T g.
// - Two terms added into a zeroed buffer give the same bits in either order (0 + a + b = 0 + b +
//   a), so the dx order does not matter (for operands small enough that a GEMM adds its whole
//   inner sum in one pass, which holds here).
// - Scaling by s before or after a sum of products rounds differently, unless s is a power of
//   two: then s * t is exact for every t, s (sum) = sum (s terms) bit for bit, and
//   fma(s, acc, c) = c + s * acc. So the two are bit for bit equal for s = alpha / r = 2, and
//   within a few ulps (checked at 1e-12) for s = 1.5.
TEST_CASE("LoRALinear against matmul(W, x) + s * matmul(B, matmul(A, x)) + b") {
  const Mat x = random_matrix(3, 5, 40), weights = random_matrix(4, 5, 41, 0.5, 1.5);
  for (const bool bias : {false, true}) {
    for (const double p : {0.0, 0.5}) {
      for (const double alpha : {4.0, 3.0}) {  // rank 2: s = 2 (a power of two) and s = 1.5
        INFO("bias ", bias, ", dropout ", p, ", alpha ", alpha);
        Lora l = make_lora(4, 3, 2, alpha, bias, p);
        const lora_grads f = fused_run(l, x, weights);
        const lora_grads u = unfused_run(l, bias, p, x, weights);
        CHECK(f.dA.cwiseAbs().maxCoeff() > 0.0);
        if (l.scale() == 2.0) {
          CHECK(same_bits(f.y, u.y));
          CHECK(same_bits(f.dx, u.dx));
          CHECK(same_bits(f.dA, u.dA));
          CHECK(same_bits(f.dB, u.dB));
        } else {
          CHECK(close_rel(f.y, u.y, 1e-12));
          CHECK(close_rel(f.dx, u.dx, 1e-12));
          CHECK(close_rel(f.dA, u.dA, 1e-12));
          CHECK(close_rel(f.dB, u.dB, 1e-12));
        }
        // The same products (3 forward: A x, W x, B u; 5 reverse: W^T g, s B^T g, s g u^T,
        // du x^T, A^T du; none for the frozen W), and no W x or B u temporary: the fused entry
        // accumulates both into y.
        CHECK(f.counters.gemms == 8);
        CHECK(u.counters.gemms == 8);
        CHECK(f.peak + 2 * sizeof(double) * static_cast<std::size_t>(f.y.size()) <= u.peak);
      }
    }
  }
}

// ------------------------------------------------------------------ checkpoints and policies

namespace {

/// n LoRA layers chained as h <- h + tanh(layer_i(h)). `Keep`: the fused nn::LoRALinear, whose
/// A x every checkpoint keeps; otherwise the same layer as a composition of core ops, whose
/// A x is an ordinary product that a re-trace recomputes.
struct lora_stack {
  std::vector<Lora> layers;
  lora_stack(int n, int width, int rank, double p) {
    layers.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) layers.push_back(make_lora(width, width, rank, 2.0 * rank, true, p, 100 + 10 * static_cast<std::uint64_t>(i)));
    for (auto& l : layers) l.weight().value() *= 0.5;
  }
  int size() const { return static_cast<int>(layers.size()); }
};

struct stack_result {
  Mat loss;
  std::vector<Mat> grads;  // dx, then dA and dB of each layer
  op_counters counters;
  std::size_t calls = 0;
  /// Per layer: calls made outside any re-trace (the forward pass). Only those compute the
  /// kept A x; a call inside a re-trace, a nested checkpoint's forward run included, replays it.
  std::vector<int> forward_runs;
  int total_forward_runs() const {
    int s = 0;
    for (int f : forward_runs) s += f;
    return s;
  }
};

template <class P, bool Keep>
stack_result run_stack(lora_stack& s, const Mat& x) {
  for (auto& l : s.layers) l.zero_grad();
  Tape<double> tape;
  tape.set_seed(77);
  stack_result r;
  r.forward_runs.assign(s.layers.size(), 0);
  const V xv = tape.variable(x);
  auto step = [&s, &r, &tape](std::size_t i, const V& h) -> V {
    ++r.calls;
    if (tape.retrace() == nullptr) ++r.forward_runs[i];
    Lora& l = s.layers[i];
    if constexpr (Keep) {
      return h + tanh(l(h));
    } else {
      const V wx = matmul(l.weight(), h);
      const V bax = matmul(l.B_matrix(), matmul(l.A(), h));
      return h + tanh(wx + l.scale() * bax + l.bias());
    }
  };
  const V y = sequential<P>(s.layers.size(), step, xv);
  const V loss = sum(square(y));
  r.loss = loss.value();
  tape.backward(loss);
  r.grads.push_back(tape.grad(xv));
  for (auto& l : s.layers) {
    r.grads.push_back(l.A().grad());
    r.grads.push_back(l.B_matrix().grad());
  }
  r.counters = tape.counters();
  return r;
}

template <class P>
struct save_of {
  using type = save::nothing;
};
template <SegmentingPolicy P>
struct save_of<P> {
  using type = typename P::save;
};

void check_same(const stack_result& ref, const stack_result& got) {
  CHECK(same_bits(ref.loss, got.loss));
  REQUIRE(ref.grads.size() == got.grads.size());
  for (std::size_t i = 0; i < ref.grads.size(); ++i) {
    INFO("gradient #", i, " (dx, then dA and dB of each layer)");
    CHECK(ref.grads[i].cwiseAbs().maxCoeff() > 0.0);
    CHECK(same_bits(ref.grads[i], got.grads[i]));
  }
}

}  // namespace

// What each product costs, per layer and step (x is a variable, so every layer has a dx):
// - the first forward: A x, W x, B u (3 GEMMs); the reverse: W^T g, s B^T g, s g u^T, du x^T,
//   A^T du (5); so 8 n for n layers under policy::none;
// - a call inside a re-trace (the innermost checkpoint re-tracing its segment): W x and B u
//   again (2), A x replayed from the kept value (0); under selective<save::matmul> the fused
//   output is kept too (0);
// - a nested checkpoint's forward run inside an enclosing re-trace (binomial): the same as a
//   re-trace, since the enclosing checkpoint kept the A x that the nested one kept;
// - the unfused composition recomputes all 3 in every call (none of them under save::matmul).
// So, with f forward runs out of c calls, gemms = 8 n + 3 (f - n) + 2 (c - f) for the kept layer
// and 8 n + 3 (c - n) for the unkept one, and nodes_replayed counts the A x products that a
// re-trace did not redo. Under every policy f = n: A x runs once per layer and step.
TEST_CASE_TEMPLATE("LoRALinear stack: every policy gives the gradients of none; a re-trace never recomputes A x", P, policy::none,
                   policy::every<2>, policy::sqrt_n, policy::binomial<2>, policy::selective<save::matmul>,
                   policy::selective<save::nothing>) {
  constexpr int n = 6, width = 8, batch = 4, rank = 2;
  constexpr bool saves_matmul = std::is_same_v<typename save_of<P>::type, save::matmul>;
  for (const double p : {0.0, 0.25}) {
    INFO("adapter dropout ", p);
    lora_stack s(n, width, rank, p);
    const Mat x = random_matrix(width, batch, 50);
    const stack_result ref = run_stack<policy::none, true>(s, x);
    const stack_result got = run_stack<P, true>(s, x);
    check_same(ref, got);
    CHECK(ref.counters.gemms == 8 * n);
    CHECK(got.calls == expected_step_calls<P>(n));
    const std::size_t calls = got.calls, forward_runs = static_cast<std::size_t>(got.total_forward_runs());
    const std::size_t retrace_calls = calls - forward_runs;

    // The same schedule without keep(): the composition of core ops.
    const stack_result ref_unkept = run_stack<policy::none, false>(s, x);
    const stack_result unkept = run_stack<P, false>(s, x);
    check_same(ref_unkept, unkept);
    CHECK(unkept.calls == calls);
    CHECK(unkept.total_forward_runs() == got.total_forward_runs());

    if constexpr (saves_matmul) {
      // Every product of a re-traced layer is kept: A x and the fused output (2 values), or
      // A x, W x and B u of the composition (3); no GEMM is redone.
      CHECK(got.counters.gemms == 8 * n + 3 * (forward_runs - n));
      CHECK(got.counters.nodes_replayed == 2 * retrace_calls);
      CHECK(unkept.counters.gemms == got.counters.gemms);
      CHECK(unkept.counters.nodes_replayed == 3 * retrace_calls);
    } else {
      // A re-traced layer redoes W x and B u and replays A x; the unkept one redoes all three.
      CHECK(got.counters.gemms == 8 * n + 3 * (forward_runs - n) + 2 * retrace_calls);
      CHECK(got.counters.nodes_replayed == retrace_calls);
      CHECK(unkept.counters.gemms == 8 * n + 3 * (calls - n));
      CHECK(unkept.counters.nodes_replayed == 0);
    }
    if constexpr (std::is_same_v<P, policy::none>) {
      CHECK(retrace_calls == 0);
    } else {
      CHECK(retrace_calls > 0);
    }
    // Each layer runs forward once per step and every other call of it replays A x: the
    // adapter's product ran once per layer and step, where the unkept stack ran it `calls`
    // times (or once too, under save::matmul, which keeps every product).
    for (int i = 0; i < n; ++i) {
      INFO("layer ", i);
      CHECK(got.forward_runs[static_cast<std::size_t>(i)] == 1);
    }
    CHECK(got.counters.gemms + (saves_matmul ? 0 : retrace_calls) == unkept.counters.gemms);
    if constexpr (RevolvePolicy<P>) {
      // binomial<2> nests checkpoints along revolve's splits. Over 6 layers: C1 = [0, 3) holding
      // C2 = [0, 1), C3 = [1, 2) and layer 2; then C4 = [3, 4), C5 = [4, 5), and layer 5 taped.
      // When C1 re-traces, C2 and C3 run their segments forward again: those forward runs replay
      // the A x that C1 kept of what C2 and C3 kept. So of 13 calls, 6 are the forward and 7
      // replay A x (2 nested forward runs of layers 0 and 1, 5 re-traces proper).
      CHECK(calls == 13);
      CHECK(got.counters.nodes_replayed == 7);
      CHECK(got.counters.gemms == 8 * n + 2 * 7);
      CHECK(unkept.counters.gemms == 8 * n + 3 * 7);
    }
  }
}

TEST_CASE("LoRALinear inside checkpoint(): same gradients; W x and B u recomputed, A x kept") {
  const Mat x = random_matrix(8, 4, 60);
  lora_stack s(2, 8, 2, 0.0);
  for (const bool keep : {true, false}) {
    const char* what = keep ? "fused layer (A x kept)" : "unfused composition (nothing kept)";
    INFO(what);
    auto layer = [&s, keep](int i, const V& h) -> V {
      Lora& l = s.layers[static_cast<std::size_t>(i)];
      if (keep) return tanh(l(h));
      return tanh(matmul(l.weight(), h) + l.scale() * matmul(l.B_matrix(), matmul(l.A(), h)) + l.bias());
    };
    auto run = [&](bool checkpointed) {
      for (auto& l : s.layers) l.zero_grad();
      Tape<double> tape;
      const V xv = tape.variable(x);
      auto segment = [&layer](const V& h) { return layer(1, layer(0, h)); };
      const V y = checkpointed ? checkpoint("two lora layers", segment, xv) : segment(xv);
      tape.backward(sum(square(y)));
      std::vector<Mat> g{tape.grad(xv), s.layers[0].A().grad(), s.layers[0].B_matrix().grad(), s.layers[1].A().grad(),
                         s.layers[1].B_matrix().grad()};
      return std::pair{g, tape.counters()};
    };
    const auto [plain_grads, plain] = run(false);
    const auto [ckpt_grads, ckpted] = run(true);
    for (std::size_t i = 0; i < plain_grads.size(); ++i) CHECK(same_bits(plain_grads[i], ckpt_grads[i]));
    CHECK(plain.gemms == 16);
    CHECK(plain.nodes_retraced == 0);
    if (keep) {
      CHECK(ckpted.gemms == 16 + 2 * 2);  // W x and B u of both layers; A x of neither
      CHECK(ckpted.nodes_replayed == 2);  // the two kept A x
    } else {
      CHECK(ckpted.gemms == 16 + 3 * 2);  // A x, W x and B u of both layers
      CHECK(ckpted.nodes_replayed == 0);
    }
  }
}

TEST_CASE("LoRALinear in float inside a checkpoint: bit for bit the plain run, close to double") {
  const Mat Wd = random_matrix(6, 5, 70), bd = random_matrix(6, 1, 71), xd = random_matrix(5, 3, 72);
  nn::LoRALinear<float> lf(Wd.cast<float>(), bd.cast<float>(), 2, 4.0, 3, 0.0);
  Lora ld(Wd, bd, 2, 4.0, 3, 0.0);
  lf.B_matrix().value() = random_matrix(6, 2, 73).cast<float>();
  ld.B_matrix().value() = lf.B_matrix().value().cast<double>();
  ld.A().value() = lf.A().value().cast<double>();
  auto run_f = [&](bool checkpointed) {
    lf.zero_grad();
    Tape<float> tape;
    const Var<float> xv = tape.variable(xd.cast<float>());
    auto seg = [&lf](const Var<float>& h) -> Var<float> { return tanh(lf(h)); };
    const Var<float> y = checkpointed ? checkpoint(seg, xv) : seg(xv);
    tape.backward(sum(square(y)));
    return std::pair{Eigen::MatrixXf(tape.grad(xv)), Eigen::MatrixXf(lf.A().grad())};
  };
  const auto plain = run_f(false), ck = run_f(true);
  CHECK(same_bits(plain.first, ck.first));
  CHECK(same_bits(plain.second, ck.second));
  Tape<double> tape;
  const V xv = tape.variable(xd);
  tape.backward(sum(square(tanh(ld(xv)))));
  CHECK(close_rel(plain.first.cast<double>(), tape.grad(xv), 1e-5));
  CHECK(close_rel(plain.second.cast<double>(), ld.A().grad(), 1e-5));
}

// ------------------------------------------------------------------ embeddings

/// A tied-embedding model: tokens looked up in E (features x vocabulary), a layer that adds a
/// second lookup inside (positions), logits E^T h, cross-entropy.
V tied_model(Tape<double>& tape, const V& table, const V& positions, nn::Linear<double>& lin, const std::vector<int>& tokens,
             const std::vector<int>& places, const std::vector<int>& targets, bool checkpointed) {
  const V h0 = gather_cols(table, tokens);
  auto block = [&](const V& h, const V& pos) -> V { return tanh(lin(h) + gather_cols(pos, places)); };
  const V h = checkpointed ? checkpoint("block", block, h0, positions) : block(h0, positions);
  (void)tape;
  return cross_entropy(matmul(transpose(table), h), targets);
}

TEST_CASE("nn::Embedding: a tied table's gradient against finite differences; checkpointed bit for bit the plain run") {
  const std::vector<int> tokens = {3, 1, 3, 0, 6, 3}, places = {0, 1, 2, 0, 1, 2}, targets = {1, 3, 0, 6, 3, 3};
  const Mat E = random_matrix(4, 7, 80), P = random_matrix(4, 3, 81);
  nn::Linear<double> lin(4, 4, 82);
  expect_grad([&](Tape<double>& t, std::span<const V> v) -> V { return tied_model(t, v[0], v[1], lin, tokens, places, targets, false); },
              {E, P});
  auto run = [&](bool checkpointed) {
    nn::Embedding<double> emb(E), pos(P);
    lin.zero_grad();
    Tape<double> tape;
    tape.backward(tied_model(tape, tape.param(emb.weight()), tape.param(pos.weight()), lin, tokens, places, targets, checkpointed));
    return std::vector<Mat>{emb.weight().grad(), pos.weight().grad(), lin.weight().grad(), lin.bias().grad()};
  };
  const auto plain = run(false), ck = run(true);
  for (std::size_t i = 0; i < plain.size(); ++i) CHECK(same_bits(plain[i], ck[i]));
  CHECK(plain[1].norm() > 0);
}

TEST_CASE("nn::Embedding: a features x vocabulary table from a seed, sizes checked") {
  nn::Embedding<float> a(11, 5, 3), b(11, 5, 3), c(11, 5, 4);
  CHECK(a.vocabulary() == 11);
  CHECK(a.features() == 5);
  CHECK(same_bits(a.weight().value(), b.weight().value()));
  CHECK(!same_bits(a.weight().value(), c.weight().value()));
  Tape<float> tape;
  const Var<float> y = a(tape, {10, 0, 10});
  CHECK(same_bits(y.value().col(0), a.weight().value().col(10)));
  CHECK(same_bits(y.value().col(2), a.weight().value().col(10)));
  CHECK_THROWS_WITH_AS(nn::Embedding<float>(0, 5), doctest::Contains("Embedding: sizes must be positive, got vocabulary 0, features 5"),
                       shape_error);
}

// ------------------------------------------------------------------ optimizers

/// Gives p the gradient g through a tape (loss = sum(p .* g)), as a training step would.
void set_gradient(Parameter<double>& p, const Mat& g) {
  p.zero_grad();
  Tape<double> tape;
  tape.backward(sum(tape.param(p) * tape.constant(g)));
}

TEST_CASE("optim::SGD: torch.optim.SGD's recurrence with momentum and weight decay, state kept across steps") {
  const Mat w0 = random_matrix(3, 4, 90);
  Parameter<double> w(w0), frozen(random_matrix(2, 2, 91), true);
  const Mat frozen0 = frozen.to_host();
  optim::SGD<double> sgd({&w, &frozen}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.01});
  Mat want = w0, v = Mat::Zero(3, 4);
  for (int k = 0; k < 4; ++k) {
    const Mat g = random_matrix(3, 4, 92 + static_cast<std::uint64_t>(k));
    set_gradient(w, g);
    sgd.step();
    v = (0.9 * v.array() + (g.array() + 0.01 * want.array())).matrix();
    want -= 0.1 * v;
    CHECK(close_rel(w.to_host(), want, 1e-14));
  }
  CHECK(sgd.steps() == 4);
  CHECK(same_bits(frozen.to_host(), frozen0));  // skipped: it has no gradient
  // Without momentum or decay, a step is w -= lr g exactly.
  Parameter<double> plain(w0);
  optim::SGD<double> step_only({&plain}, {.lr = 0.25});
  const Mat g = random_matrix(3, 4, 99);
  set_gradient(plain, g);
  step_only.step();
  CHECK(same_bits(plain.to_host(), (w0 - 0.25 * g).eval()));
}

TEST_CASE("optim::Adam: the first step moves each weight by lr against its gradient's sign; decoupled decay shrinks by 1 - lr wd") {
  const Mat w0 = random_matrix(5, 3, 100);
  Parameter<double> w(w0);
  optim::Adam<double> adam({&w}, {.lr = 0.01});
  const Mat g = random_away_from_zero(5, 3, 101);  // |g| >= 0.2 >> eps, with random signs
  set_gradient(w, g);
  adam.step();
  // m / (1 - b1) = g and sqrt(v / (1 - b2)) = |g|: the step is lr g / (|g| + eps).
  const Mat moved = w.to_host() - w0;
  for (int i = 0; i < moved.size(); ++i) CHECK(std::abs(moved(i) + 0.01 * (g(i) > 0 ? 1.0 : -1.0)) <= 1e-9);

  // With zero gradients the moments stay zero: only the decoupled decay acts.
  Parameter<double> d(w0);
  optim::Adam<double> decay({&d}, {.lr = 0.1, .weight_decay = 0.5});
  for (int k = 0; k < 3; ++k) decay.step();
  CHECK(close_rel(d.to_host(), (w0 * std::pow(1.0 - 0.1 * 0.5, 3)).eval(), 1e-15));
}

TEST_CASE("optim::Adam: torch.optim.AdamW's update over steps; a parameter unfrozen later starts its own moments and step count") {
  const Mat w0 = random_matrix(4, 2, 110);
  Parameter<double> w(w0), late(w0, true);
  const optim::Adam<double>::options o{.lr = 0.05, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1};
  optim::Adam<double> adam({&w, &late}, o);
  Mat want = w0, m = Mat::Zero(4, 2), v = Mat::Zero(4, 2);
  Mat want_late = w0, m_late = Mat::Zero(4, 2), v_late = Mat::Zero(4, 2);
  int late_steps = 0;
  auto reference = [&o](Mat& x, Mat& mm, Mat& vv, const Mat& g, int t) {
    x *= 1.0 - o.lr * o.weight_decay;
    mm = o.beta1 * mm + (1.0 - o.beta1) * g;
    vv = (o.beta2 * vv.array() + (1.0 - o.beta2) * g.array().square()).matrix();
    const double c1 = 1.0 - std::pow(o.beta1, t), c2 = 1.0 - std::pow(o.beta2, t);
    x = (x.array() - o.lr * (mm.array() / c1) / ((vv.array() / c2).sqrt() + o.eps)).matrix();
  };
  for (int k = 1; k <= 5; ++k) {
    if (k == 3) late.set_frozen(false);
    const Mat g = random_matrix(4, 2, 111 + static_cast<std::uint64_t>(k));
    set_gradient(w, g);
    if (!late.frozen()) set_gradient(late, g);
    adam.step();
    reference(want, m, v, g, k);
    if (!late.frozen()) reference(want_late, m_late, v_late, g, ++late_steps);  // its own steps: t = 1, 2, 3
    CHECK(close_rel(w.to_host(), want, 1e-13));
    CHECK(close_rel(late.to_host(), want_late, 1e-13));
  }
  CHECK(late_steps == 3);
  CHECK(adam.steps() == 5);
}

TEST_CASE("optim: Adam trains a least-squares fit to its solution, in float too") {
  auto fit = [](auto zero) {
    using T = decltype(zero);
    using M = Eigen::Matrix<T, -1, -1>;
    const M A = random_matrix(3, 6, 120).cast<T>(), X = random_matrix(6, 40, 121).cast<T>();
    const M Y = A * X;
    Parameter<T> W(M(M::Zero(3, 6)));
    optim::Adam<T> adam({&W}, {.lr = 0.02});
    double loss = 0;
    for (int k = 0; k < 1500; ++k) {
      Tape<T> tape;
      const Var<T> l = mse(matmul(W, tape.constant(X)), tape.constant(Y));
      tape.backward(l);
      loss = static_cast<double>(l.item());
      adam.step();
      adam.zero_grad();
    }
    CAPTURE(loss);
    CHECK(loss < (std::is_same_v<T, float> ? 1e-8 : 1e-12));
    CHECK(close_rel(W.to_host().template cast<double>(), A.template cast<double>(), std::is_same_v<T, float> ? 1e-3 : 1e-5));
  };
  fit(0.0);
  fit(0.0f);
}

TEST_CASE("optim::Adam in float: the first step is lr against the gradient's sign, also with beta2 near 1") {
  // In float, 1 - 0.99999f is 1.00136e-5: computed in float, the second moment disagreed with
  // the bias correction and the first step was 0.07 % off lr.
  for (const double beta2 : {0.999, 0.9999, 0.99999}) {
    CAPTURE(beta2);
    // From zero, so that w after the step is the step itself, rounded once (1e-7 relative).
    const Eigen::MatrixXf w0 = Eigen::MatrixXf::Zero(4, 4), g = random_away_from_zero(4, 4, 141).cast<float>();
    Parameter<float> w(w0);
    optim::Adam<float> adam({&w}, {.lr = 0.01, .beta2 = beta2});
    Tape<float> tape;
    tape.backward(sum(tape.param(w) * tape.constant(g)));
    adam.step();
    const Eigen::MatrixXf moved = w.value() - w0;
    for (int i = 0; i < moved.size(); ++i) CHECK(std::abs(std::abs(static_cast<double>(moved(i))) - 0.01) <= 0.01 * 1e-6);
  }
}

TEST_CASE("optim: bad options and parameter lists are errors that name the optimizer") {
  Parameter<double> p(random_matrix(2, 2, 130));
  CHECK_THROWS_WITH_AS(optim::Adam<double>({&p}, {.beta1 = 1.0}), doctest::Contains("Adam: beta1 must be in [0, 1), got 1"), ckpt::error);
  CHECK_THROWS_WITH_AS(optim::Adam<double>({&p}, {.lr = -0.1}), doctest::Contains("Adam: lr must be in [0, inf), got -0.1"), ckpt::error);
  CHECK_THROWS_WITH_AS(optim::SGD<double>({&p}, {.momentum = -0.5}), doctest::Contains("SGD: momentum must be in [0, 1), got -0.5"),
                       ckpt::error);
  CHECK_THROWS_WITH_AS(optim::SGD<double>({&p, nullptr}), doctest::Contains("SGD: parameter 1 is null"), ckpt::error);
  CHECK_THROWS_WITH_AS(optim::Adam<double>({&p, &p}), doctest::Contains("Adam: parameters 0 and 1 are the same 2x2 parameter"), ckpt::error);
  optim::Adam<double> adam({&p});
  CHECK_THROWS_WITH_AS(adam.set_lr(std::nan("")), doctest::Contains("Adam: lr must be in [0, inf), got nan"), ckpt::error);
}

// ------------------------------------------------------------------ the frozen W

TEST_CASE("LoRALinear: no gradient buffer is ever allocated or written for W") {
  lora_stack s(3, 6, 2, 0.1);
  const Mat x = random_matrix(6, 5, 80);
  std::vector<Mat> W0;
  for (auto& l : s.layers) {
    CHECK(l.weight().frozen());
    CHECK(l.weight().grad_data() == nullptr);
    CHECK(l.bias().frozen());
    CHECK(l.bias().grad_data() == nullptr);
    W0.push_back(l.weight().value());
  }
  // A few SGD steps on A and B, checkpointed, as a fine-tuning loop would run them.
  Tape<double> tape;
  double first = 0, last = 0;
  for (int step = 0; step < 8; ++step) {
    tape.reset();
    for (auto& l : s.layers) l.zero_grad();
    const V y = sequential<policy::every<2>>(
        s.layers.size(), [&s](std::size_t i, const V& h) -> V { return h + tanh(s.layers[i](h)); }, tape.constant(x));
    const V loss = mean(square(y - 0.5));
    tape.backward(loss);
    (step == 0 ? first : last) = loss.item();
    // x is a constant: layer 0 has no dx (W^T g, A^T du), so 8 * 3 - 2 products, plus the
    // re-trace of layers 0 and 1 (W x and B u each); never one for dW.
    CHECK(tape.counters().gemms == 8 * 3 - 2 + 2 * 2);
    for (auto& l : s.layers) {
      l.A().value() -= 0.5 * l.A().grad();
      l.B_matrix().value() -= 0.5 * l.B_matrix().grad();
    }
  }
  CHECK(last < first);
  for (std::size_t i = 0; i < s.layers.size(); ++i) {
    Lora& l = s.layers[i];
    CHECK(l.weight().grad_data() == nullptr);
    CHECK(l.bias().grad_data() == nullptr);
    CHECK_THROWS_WITH_AS(l.weight().grad(), doctest::Contains("grad: parameter 6x6 is frozen and has no gradient"), tape_error);
    CHECK_THROWS_AS(l.bias().grad(), tape_error);
    CHECK(same_bits(l.weight().value(), W0[i]));
  }
  // With a trainable W the same layer costs a ninth product (dW = g x^T).
  Lora& l = s.layers[0];
  Parameter<double> W(Mat(l.weight().value()));
  Tape<double> t2;
  const V xv = t2.variable(x);
  t2.backward(sum(matmul(W, xv) + l.scale() * matmul(l.B_matrix(), matmul(l.A(), xv))));
  CHECK(t2.counters().gemms == 9);
}

// ------------------------------------------------------------------ merge and unmerge

TEST_CASE("LoRALinear: merge() folds s B A into W, unmerge() restores W bit for bit") {
  Lora l = make_lora(6, 5, 3, 6.0, true, 0.0);
  const Mat W0 = l.weight().value(), x = random_matrix(5, 7, 90);
  Tape<double> tape;
  const Mat y = l(tape.constant(x)).value();
  CHECK_THROWS_WITH_AS(l.merged_forward(tape.constant(x)), doctest::Contains("merged_forward() needs merge() first"), tape_error);

  l.merge();
  CHECK(l.merged());
  CHECK_FALSE(same_bits(l.weight().value(), W0));
  CHECK(close_rel(Mat(l.weight().value()), W0 + l.scale() * l.B_matrix().value() * l.A().value(), 1e-15));
  CHECK(l.weight().frozen());
  CHECK(l.weight().grad_data() == nullptr);
  const Mat merged_W = l.weight().value();
  l.merge();  // a second merge changes nothing
  CHECK(same_bits(l.weight().value(), merged_W));
  const V ym = l.merged_forward(tape.constant(x));
  CHECK(close_rel(Mat(ym.value()), y, 1e-12));
  CHECK_THROWS_WITH_AS(l(tape.constant(x)), doctest::Contains("merged into W"), tape_error);

  l.unmerge();
  CHECK_FALSE(l.merged());
  CHECK(same_bits(l.weight().value(), W0));
  l.unmerge();  // a second unmerge changes nothing
  CHECK(same_bits(l.weight().value(), W0));
  Tape<double> t2;
  CHECK(same_bits(Mat(l(t2.constant(x)).value()), y));

  // Train, merge, unmerge, many times: W never drifts (it is restored from a copy, not by
  // subtracting s B A, which would round).
  for (int round = 0; round < 20; ++round) {
    l.A().value() *= 1.1;
    l.B_matrix().value().array() += 0.01;
    l.merge();
    l.unmerge();
  }
  CHECK(same_bits(l.weight().value(), W0));
}

// ------------------------------------------------------------------ errors

TEST_CASE("LoRALinear: shape errors at construction and at forward name the op and the shapes") {
  const Mat W = random_matrix(4, 3, 1);
  CHECK_THROWS_WITH_AS((void)Lora(W, 0, 1.0), doctest::Contains("LoRALinear: rank 0 must be in [1, min(out, in) = 3] for W 4x3"),
                       shape_error);
  CHECK_THROWS_WITH_AS((void)Lora(W, 4, 1.0), doctest::Contains("LoRALinear: rank 4 must be in [1, min(out, in) = 3] for W 4x3"),
                       shape_error);
  CHECK_THROWS_WITH_AS((void)Lora(W, random_matrix(3, 1, 2), 2, 1.0),
                       doctest::Contains("LoRALinear: bias 3x1 does not fit weight 4x3 (expected 4x1)"), shape_error);
  CHECK_THROWS_WITH_AS((void)Lora(W, random_matrix(4, 2, 2), 2, 1.0),
                       doctest::Contains("LoRALinear: bias 4x2 does not fit weight 4x3 (expected 4x1)"), shape_error);
  CHECK_THROWS_WITH_AS((void)Lora(W, 2, 1.0, 0, 1.0), doctest::Contains("LoRALinear: dropout must be in [0, 1), got 1"), error);

  Lora l(W, 2, 1.0);
  Tape<double> tape;
  const V x = tape.variable(random_matrix(5, 2, 3));
  const std::size_t nodes = tape.node_count(), entries = tape.entry_count();
  CHECK_THROWS_WITH_AS(l(x), doctest::Contains("lora_linear: input 5x2 has 5 features, W 4x3 expects 3"), shape_error);
  // An expression operand is checked before it is recorded: nothing is left on the tape.
  CHECK_THROWS_WITH_AS(l(x * 2.0), doctest::Contains("lora_linear: input 5x2 has 5 features, W 4x3 expects 3"), shape_error);
  CHECK(tape.node_count() == nodes);
  CHECK(tape.entry_count() == entries);
  Parameter<double> p(random_matrix(3, 2, 4));
  CHECK_THROWS_WITH_AS(l(p), doctest::Contains("lora_linear: the operand is not on a tape"), tape_error);
  // The layer still works after the errors.
  CHECK(l(tape.variable(random_matrix(3, 2, 5))).dims() == shape{4, 2});
}

TEST_CASE("nn::Linear: shape errors at construction and at forward") {
  CHECK_THROWS_WITH_AS((void)nn::Linear<double>(0, 3), doctest::Contains("Linear: sizes must be positive, got in 0, out 3"), shape_error);
  CHECK_THROWS_WITH_AS((void)nn::Linear<double>(random_matrix(4, 3, 1), random_matrix(3, 1, 2)),
                       doctest::Contains("Linear: bias 3x1 does not fit weight 4x3 (expected 4x1)"), shape_error);
  nn::Linear<double> lin(3, 4, 7);
  Tape<double> tape;
  const V x = tape.variable(random_matrix(5, 2, 3));
  const std::size_t nodes = tape.node_count();
  CHECK_THROWS_WITH_AS(V(lin(x)), doctest::Contains("linear: input 5x2 has 5 features, W 4x3 expects 3"), shape_error);
  CHECK_THROWS_WITH_AS(lin.product(x * 2.0), doctest::Contains("linear: input 5x2 has 5 features, W 4x3 expects 3"), shape_error);
  CHECK(tape.node_count() == nodes);
}

// ------------------------------------------------------------------ nn::Linear

namespace {

/// Gradients of sum(lin(x) .* weights) with respect to x and, when trainable, W and b, against
/// central differences.
void check_linear_fd(nn::Linear<double>& lin) {
  const Mat x0 = random_matrix(lin.in_features(), 5, 110), weights = random_matrix(lin.out_features(), 5, 111, 0.5, 1.5);
  const Mat W0 = lin.weight().value(), b0 = lin.bias().value();
  auto run = [&](const Mat& x, const Mat& W, const Mat& b, Mat* dx) {
    lin.weight().value() = W;
    lin.bias().value() = b;
    lin.zero_grad();
    Tape<double> tape;
    const V xv = tape.variable(x);
    const V loss = sum(relu(lin(xv)) * tape.constant(weights));
    if (dx) {
      tape.backward(loss);
      *dx = tape.grad(xv);
    }
    return loss.item();
  };
  Mat dx;
  run(x0, W0, b0, &dx);
  const Mat dW = lin.frozen() ? Mat() : Mat(lin.weight().grad());
  const Mat db = lin.frozen() || !lin.has_bias() ? Mat() : Mat(lin.bias().grad());
  const auto numeric = numeric_grad([&](const std::vector<Mat>& in) { return run(in[0], in[1], in[2], nullptr); }, {x0, W0, b0});
  expect_close(dx, numeric[0], 1e-7, "dx");
  if (lin.frozen()) {
    CHECK(lin.weight().grad_data() == nullptr);
    CHECK(lin.bias().grad_data() == nullptr);
    CHECK_THROWS_AS(lin.weight().grad(), tape_error);
  } else {
    expect_close(dW, numeric[1], 1e-7, "dW");
    CHECK(dW.cwiseAbs().maxCoeff() > 0.0);
    if (lin.has_bias()) {
      expect_close(db, numeric[2], 1e-7, "db");
    } else {
      CHECK(lin.bias().grad_data() == nullptr);  // no bias: a frozen zero vector, no gradient
    }
  }
}

}  // namespace

TEST_CASE("nn::Linear: gradients against finite differences, trainable and frozen") {
  SUBCASE("trainable, with bias") {
    nn::Linear<double> lin(3, 4, 7);
    CHECK_FALSE(lin.frozen());
    check_linear_fd(lin);
  }
  SUBCASE("trainable, no bias") {
    nn::Linear<double> lin(3, 4, 7, /*bias=*/false);
    CHECK(lin.bias().value().isZero(0.0));
    check_linear_fd(lin);
  }
  SUBCASE("frozen") {
    nn::Linear<double> lin(3, 4, 7, true, /*frozen=*/true);
    CHECK(lin.frozen());
    check_linear_fd(lin);
  }
  SUBCASE("from given weights; frozen, then unfrozen") {
    nn::Linear<double> lin(random_matrix(4, 3, 8), random_matrix(4, 1, 9), true);
    check_linear_fd(lin);
    lin.set_frozen(false);
    CHECK(lin.weight().grad().isZero(0.0));
    check_linear_fd(lin);
  }
}

TEST_CASE("nn::Linear: a frozen layer computes no weight GEMM in reverse") {
  const Mat x = random_matrix(3, 5, 120);
  for (const bool frozen : {false, true}) {
    for (const bool x_grad : {false, true}) {
      const char* kind = frozen ? "frozen" : "trainable";
      const char* input = x_grad ? "variable" : "constant";
      INFO(kind, ", x ", input);
      nn::Linear<double> lin(3, 4, 7, true, frozen);
      Tape<double> tape;
      const V xv = x_grad ? tape.variable(x) : tape.constant(x);
      const V y = lin(xv);
      CHECK(tape.counters().gemms == 1);
      if (!frozen || x_grad) {
        tape.backward(sum(tanh(y)));
        // reverse: dW = g x^T (trainable only) and dx = W^T g (x a variable only)
        CHECK(tape.counters().gemms == 1 + (frozen ? 0u : 1u) + (x_grad ? 1u : 0u));
      } else {
        CHECK_FALSE(y.requires_grad());  // nothing to differentiate: no entry, no reverse
      }
    }
  }
}

TEST_CASE("LoRALinear from a Linear: copies and freezes the weights, starts as the base layer") {
  nn::Linear<double> base(5, 4, 11);
  Lora l(base, 2, 8.0, 12);
  CHECK_FALSE(base.frozen());  // the base layer is untouched
  CHECK(l.weight().frozen());
  CHECK(l.weight().grad_data() == nullptr);
  CHECK(same_bits(l.weight().value(), base.weight().value()));
  CHECK(same_bits(l.bias().value(), base.bias().value()));
  CHECK(l.B_matrix().value().isZero(0.0));
  CHECK(l.A().value().cwiseAbs().maxCoeff() > 0.0);
  CHECK(l.rank() == 2);
  CHECK(l.scale() == 4.0);
  const Mat x = random_matrix(5, 6, 130);
  Tape<double> tape;
  // B = 0: the adapter adds exact zeros, so the output is the base layer's, bit for bit.
  CHECK(same_bits(Mat(l(tape.constant(x)).value()), Mat(V(base(tape.constant(x))).value())));
  nn::Linear<double> no_bias(5, 4, 11, false);
  Lora l2(no_bias, 2, 8.0, 12);
  CHECK(close_rel(Mat(l2(tape.constant(x)).value()), no_bias.weight().value() * x, 1e-14));
}
