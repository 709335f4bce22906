// LoRA fine-tuning of a small causal transformer, every block checkpointed.
//
// The model: token and positional embeddings (columns of the embedding tables looked up with
// gather_cols, which nn::Embedding wraps), `blocks` pre-norm blocks of multi-head causal
// self-attention and a GELU MLP with RMS norms and residuals, a final RMS norm and an output
// layer tied to the token embedding. Attention is ckpt::attention: softmax(K^T Q / sqrt(dh))
// per sequence and head (dh = d / heads features; keys x queries, keys after the query
// masked), applied to V, as batched products and a softmax in one tape entry per block,
// whatever the batch and heads.
//
// Why two phases: LoRA adapts a model that already knows something, so we first make one.
// 1. "Pretraining": every weight trainable, task COPY: read x_1..x_L, a separator, then
//    write x_1..x_L again. The model learns to attend by position.
// 2. Fine-tuning: the pretrained embeddings, projections and output layer are frozen
//    (nn::LoRALinear copies each nn::Linear's weight and bias and freezes them); rank-r
//    adapters on the q, k, v, o and both MLP projections of every block are the only trainable
//    weights (with the RMS-norm gains). Task REVERSE: write x_L..x_1. The copying model is
//    right only where a digit happens to equal its mirror image (1 time in 10, chance level);
//    the adapters must re-aim its attention from position i to position L + 1 - i.
// Each block is one checkpoint() in both phases: the forward keeps the block's input and the
// adapters' rank-r activations A x (ckpt::keep, inside nn::LoRALinear), the reverse re-traces
// the block, recomputing W x, attention and MLP but never A x.
//
// Printed: the loss falling, the accuracy before and after fine-tuning (per token and per whole
// sequence, on fresh sequences; chance is 1/digits per token), and the tape's peak activation
// memory for one fine-tuning step with and without checkpointing (same batch, and the same
// gradients bit for bit).
#include <ckpt/ckpt.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <span>
#include <vector>

using namespace ckpt;
using Mat = Eigen::MatrixXf;
using V = Var<float>;

namespace {

// ------------------------------------------------------------------ sizes

constexpr int digits = 10;           // tokens 0..9
constexpr int sep = digits;          // the separator token
constexpr int vocab = digits + 1;
constexpr int L = 6;                 // sequence to copy or reverse
constexpr int T = 2 * L;             // x_1..x_L, sep, y_1..y_{L-1}: positions L..2L-1 predict y_1..y_L
constexpr int d = 48, heads = 4, hidden = 2 * d, blocks = 3;  // heads of d / heads = 12 features
constexpr int batch = 32;            // sequences per step
constexpr int N = batch * T;         // columns of the activations
constexpr int pretrain_steps = 300, finetune_steps = 400, rank = 8;
constexpr double alpha = 16.0;

enum class task { copy, reverse };

struct data {
  std::vector<int> tokens, positions;  // one per column: the token, its position in the sequence
  std::vector<int> labels;  // batch * L targets, sequence by sequence
};

data make_batch(std::mt19937& gen, task tk) {
  std::uniform_int_distribution<int> digit(0, digits - 1);
  data b;
  for (int s = 0; s < batch; ++s) {
    int x[L], y[L];
    for (int i = 0; i < L; ++i) x[i] = digit(gen);
    for (int i = 0; i < L; ++i) y[i] = tk == task::copy ? x[i] : x[L - 1 - i];
    for (int p = 0; p < T; ++p) {
      const int tok = p < L ? x[p] : p == L ? sep : y[p - L - 1];
      b.tokens.push_back(tok);
      b.positions.push_back(p);
    }
    for (int i = 0; i < L; ++i) b.labels.push_back(y[i]);
  }
  return b;
}

// ------------------------------------------------------------------ the model

Mat randn(int rows, int cols, float stddev, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> n(0.0f, stddev);
  Mat m(rows, cols);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) m(i, j) = n(gen);
  return m;
}

/// Proj is nn::Linear<float> (pretraining) or nn::LoRALinear<float> (fine-tuning).
template <class Proj>
struct block {
  Proj q, k, v, o, fc1, fc2;
  Parameter<float> g1, g2;  // RMS-norm gains
};

template <class Proj>
struct transformer {
  Parameter<float> embed, pos, gf;  // d x vocab, d x T, d x 1
  std::vector<block<Proj>> layers;

  /// One block: h + attn(norm(h)), then + mlp(norm(.)).
  V forward_block(int i, const V& h) {
    block<Proj>& b = layers[static_cast<std::size_t>(i)];
    const V a = rms_norm(h, b.g1);
    const V q = b.q(a), k = b.k(a), v = b.v(a);
    const V att = attention(q, k, v, heads, T, /*causal=*/true);
    const V h1 = h + V(b.o(att));
    const V m = rms_norm(h1, b.g2);
    return h1 + V(b.fc2(gelu(V(b.fc1(m)))));
  }

  /// Logits (vocab x batch * L) at the positions that predict y_1..y_L.
  V logits(Tape<float>& tape, const data& b, bool checkpointed) {
    V h = gather_cols(tape.param(embed), b.tokens) + gather_cols(tape.param(pos), b.positions);
    for (int i = 0; i < blocks; ++i) {
      if (checkpointed)
        h = checkpoint("block", [this, i](const V& x) { return forward_block(i, x); }, h);
      else
        h = forward_block(i, h);
    }
    std::vector<int> predicting;  // the columns of positions L..2L-1 of each sequence
    for (int s = 0; s < batch; ++s)
      for (int i = 0; i < L; ++i) predicting.push_back(s * T + L + i);
    return matmul(transpose(embed), rms_norm(gather_cols(h, predicting), gf));
  }
};

transformer<nn::Linear<float>> make_base(std::uint64_t seed) {
  transformer<nn::Linear<float>> m{Parameter<float>(randn(d, vocab, 0.3f, seed)), Parameter<float>(randn(d, T, 0.3f, seed + 1)),
                                   Parameter<float>(Mat(Mat::Ones(d, 1))), {}};
  for (int i = 0; i < blocks; ++i) {
    const std::uint64_t s = seed + 100 * static_cast<std::uint64_t>(i + 1);
    m.layers.push_back({nn::Linear<float>(d, d, s), nn::Linear<float>(d, d, s + 1), nn::Linear<float>(d, d, s + 2),
                        nn::Linear<float>(d, d, s + 3), nn::Linear<float>(d, hidden, s + 4), nn::Linear<float>(hidden, d, s + 5),
                        Parameter<float>(Mat(Mat::Ones(d, 1))), Parameter<float>(Mat(Mat::Ones(d, 1)))});
  }
  return m;
}

/// The fine-tuning model: the base's weights copied and frozen, LoRA adapters on every
/// projection, norm gains trainable.
transformer<nn::LoRALinear<float>> make_lora(transformer<nn::Linear<float>>& base, std::uint64_t seed) {
  using Lora = nn::LoRALinear<float>;
  transformer<Lora> m{Parameter<float>(Mat(base.embed.value()), true), Parameter<float>(Mat(base.pos.value()), true),
                      Parameter<float>(Mat(base.gf.value())), {}};
  for (std::size_t i = 0; i < base.layers.size(); ++i) {
    auto& b = base.layers[i];
    const std::uint64_t s = seed + 10 * i;
    m.layers.push_back({Lora(b.q, rank, alpha, s), Lora(b.k, rank, alpha, s + 1), Lora(b.v, rank, alpha, s + 2),
                        Lora(b.o, rank, alpha, s + 3), Lora(b.fc1, rank, alpha, s + 4), Lora(b.fc2, rank, alpha, s + 5),
                        Parameter<float>(Mat(b.g1.value())), Parameter<float>(Mat(b.g2.value()))});
  }
  return m;
}

std::vector<Parameter<float>*> trainable(transformer<nn::Linear<float>>& m) {
  std::vector<Parameter<float>*> p{&m.embed, &m.pos, &m.gf};
  for (auto& b : m.layers) {
    for (auto* l : {&b.q, &b.k, &b.v, &b.o, &b.fc1, &b.fc2}) p.insert(p.end(), {&l->weight(), &l->bias()});
    p.insert(p.end(), {&b.g1, &b.g2});
  }
  return p;
}
std::vector<Parameter<float>*> trainable(transformer<nn::LoRALinear<float>>& m) {
  std::vector<Parameter<float>*> p{&m.gf};
  for (auto& b : m.layers) {
    for (auto* l : {&b.q, &b.k, &b.v, &b.o, &b.fc1, &b.fc2}) p.insert(p.end(), {&l->A(), &l->B_matrix()});
    p.insert(p.end(), {&b.g1, &b.g2});
  }
  return p;
}

// ------------------------------------------------------------------ training

struct accuracy {
  double token, sequence;
};

template <class Proj>
accuracy evaluate(transformer<Proj>& m, task tk, int batches, std::uint64_t seed) {
  std::mt19937 gen(static_cast<unsigned>(seed));
  long right = 0, total = 0, seq_right = 0, seqs = 0;
  for (int k = 0; k < batches; ++k) {
    const data b = make_batch(gen, tk);
    Tape<float> tape;
    const Mat lg = m.logits(tape, b, false).value();
    for (int s = 0; s < batch; ++s) {
      bool all = true;
      for (int i = 0; i < L; ++i) {
        const int col = s * L + i;
        Eigen::Index best = 0;
        lg.col(col).maxCoeff(&best);
        const bool ok = best == b.labels[static_cast<std::size_t>(col)];
        right += ok;
        all = all && ok;
        ++total;
      }
      seq_right += all;
      ++seqs;
    }
  }
  return {static_cast<double>(right) / static_cast<double>(total), static_cast<double>(seq_right) / static_cast<double>(seqs)};
}

template <class Proj>
void train(transformer<Proj>& m, optim::Adam<float>& opt, task tk, int steps, std::uint64_t seed, const char* phase) {
  std::mt19937 gen(static_cast<unsigned>(seed));
  Tape<float> tape;
  double running = 0;
  for (int s = 1; s <= steps; ++s) {
    tape.reset();
    opt.zero_grad();
    const data b = make_batch(gen, tk);
    const V loss = cross_entropy(m.logits(tape, b, true), b.labels);
    tape.backward(loss);
    opt.step();
    running += loss.item();
    if (s == 1 || s % 50 == 0) {
      std::printf("  %s step %4d  loss %.4f\n", phase, s, running / (s == 1 ? 1 : 50));
      running = 0;
    }
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  std::printf("LoRA fine-tuning of a causal transformer: %d blocks, d = %d, %d heads, MLP %d, %d sequences of %d tokens per step\n",
              blocks, d, heads, hidden, batch, T);
  std::printf("matrix products through %s; chance accuracy is %.0f%% per token\n\n", backend::cpu::gemm_engine(), 100.0 / digits);

  // 1. Pretraining (all weights trainable) on COPY.
  auto base = make_base(1);
  {
    optim::Adam<float> opt(trainable(base), {.lr = 3e-3});
    std::printf("pretraining on COPY, all weights trainable (%d steps; loss: mean of the last 50 steps)\n", pretrain_steps);
    train(base, opt, task::copy, pretrain_steps, 11, "pretrain");
  }
  const accuracy base_copy = evaluate(base, task::copy, 8, 99), base_rev = evaluate(base, task::reverse, 8, 99);
  std::printf("pretrained model: COPY accuracy %.1f%% per token (%.1f%% whole sequences), REVERSE accuracy %.1f%% (%.1f%%)\n\n",
              100 * base_copy.token, 100 * base_copy.sequence, 100 * base_rev.token, 100 * base_rev.sequence);

  // 2. LoRA fine-tuning (base frozen) on REVERSE.
  auto lora = make_lora(base, 7);
  optim::Adam<float> opt(trainable(lora), {.lr = 3e-3});
  std::size_t trained = 0, frozen = 0;
  for (auto* p : opt.parameters()) trained += static_cast<std::size_t>(p->rows() * p->cols());
  for (auto& b : lora.layers)
    for (auto* l : {&b.q, &b.k, &b.v, &b.o, &b.fc1, &b.fc2}) frozen += static_cast<std::size_t>(l->weight().dims().size() + l->bias().dims().size());
  frozen += static_cast<std::size_t>(d * (vocab + T));
  std::printf("fine-tuning on REVERSE with LoRA rank %d (alpha %.0f): %zu trainable values, %zu frozen (no gradient buffers)\n", rank,
              alpha, trained, frozen);
  std::printf("(loss: mean of the last 50 steps)\n");
  train(lora, opt, task::reverse, finetune_steps, 12, "finetune");
  const accuracy tuned = evaluate(lora, task::reverse, 8, 99);
  std::printf("\nfine-tuned model: REVERSE accuracy %.1f%% per token (%.1f%% whole sequences); before: %.1f%%, chance: %.1f%%\n",
              100 * tuned.token, 100 * tuned.sequence, 100 * base_rev.token, 100.0 / digits);

  // 3. Memory: one step with and one without checkpointing, on the same batch.
  std::mt19937 gen(5);
  const data b = make_batch(gen, task::reverse);
  std::size_t peak[2], gemms[2];
  std::vector<Mat> grads[2];
  for (int c = 0; c < 2; ++c) {
    Tape<float> tape;
    opt.zero_grad();
    tape.backward(cross_entropy(lora.logits(tape, b, c == 1), b.labels));
    peak[c] = tape.peak_bytes();
    gemms[c] = tape.counters().gemms;
    for (auto* p : opt.parameters()) grads[c].push_back(p->grad());
  }
  bool same = true;
  for (std::size_t i = 0; i < grads[0].size(); ++i)
    same = same && std::memcmp(grads[0][i].data(), grads[1][i].data(), sizeof(float) * static_cast<std::size_t>(grads[0][i].size())) == 0;
  std::printf("\npeak activation memory per step: %.1f KiB without checkpointing, %.1f KiB with each block checkpointed (%.2fx)\n",
              peak[0] / 1024.0, peak[1] / 1024.0, static_cast<double>(peak[0]) / static_cast<double>(peak[1]));
  // What the re-traces redo: per block, W x and B u of the six projections and the two
  // attention products of every (sequence, head); A x of none (it would add 6 per block).
  const std::size_t redo = static_cast<std::size_t>(blocks) * (6 * 2 + batch * heads * 2);
  std::printf("matrix products per step: %zu without, %zu with checkpointing: the re-traces redid %zu %s %d blocks x (6 x [W x, B u] + %d "
              "attention products)%s\n",
              gemms[0], gemms[1], gemms[1] - gemms[0], gemms[1] - gemms[0] == redo ? "=" : "!=", blocks, batch * heads * 2,
              gemms[1] - gemms[0] == redo ? ", no A x" : "");
  std::printf("kept adapter activations A x: %.1f KiB per block (6 x %d x %d floats), kept from the forward to the block's re-trace\n",
              6.0 * rank * N * sizeof(float) / 1024.0, rank, N);
  std::printf("gradients with and without checkpointing: %s\n", same ? "bit for bit equal" : "DIFFERENT");
  std::printf("total time %.1f s\n", seconds_since(t0));
  const bool ok = same && gemms[1] - gemms[0] == redo && tuned.token > 3.0 / digits;
  return ok ? 0 : 1;
}
