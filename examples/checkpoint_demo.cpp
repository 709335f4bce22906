// The main demo: one deep residual MLP trained on a synthetic task under each checkpoint
// policy. Prints per policy the step time, the tape's peak memory and their ratios to `none`,
// and checks that every policy produced bit-for-bit the same gradients (hence the same
// training trajectory) as `none`.
#include <ckpt/ckpt.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace ckpt;
using Mat = Eigen::MatrixXf;

namespace {

constexpr int depth = 32, width = 256, batch = 128, classes = 4, steps = 12;

/// Points on `classes` interleaved spirals in the plane, lifted to `width` features by a
/// fixed random projection (so the first layer is an ordinary hidden layer).
struct task {
  Mat x;
  std::vector<int> labels;
};
task make_task(std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  std::uniform_real_distribution<float> radius(0.1f, 1.0f);
  Mat proj = Mat::Random(width, 2);
  task t{Mat(width, batch), std::vector<int>(batch)};
  for (int j = 0; j < batch; ++j) {
    const int c = j % classes;
    const float r = radius(gen);
    const float a = 3.0f * r + 2.0f * 3.14159265f * static_cast<float>(c) / classes;
    Eigen::Vector2f p(r * std::cos(a) + noise(gen), r * std::sin(a) + noise(gen));
    t.x.col(j) = (proj * p).array().tanh();
    t.labels[j] = c;
  }
  return t;
}

struct model {
  std::vector<Parameter<float>> W, b;
  Parameter<float> head, head_b;
  explicit model(std::uint64_t seed) {
    std::srand(static_cast<unsigned>(seed));
    for (int i = 0; i < depth; ++i) {
      W.emplace_back(Mat(Mat::Random(width, width) * (0.3f / std::sqrt(float(width)))));
      b.emplace_back(Mat(Mat::Zero(width, 1)));
    }
    head = Parameter<float>(Mat(Mat::Random(classes, width) * (1.0f / std::sqrt(float(width)))));
    head_b = Parameter<float>(Mat(Mat::Zero(classes, 1)));
  }
  std::vector<Parameter<float>*> params() {
    std::vector<Parameter<float>*> p;
    for (int i = 0; i < depth; ++i) p.insert(p.end(), {&W[i], &b[i]});
    p.insert(p.end(), {&head, &head_b});
    return p;
  }
};

struct result {
  double median_ms;
  std::size_t peak;
  std::vector<float> losses;
  std::vector<Mat> first_grads;
  std::size_t step_calls;
};

template <Policy P>
result train(const task& data) {
  model m(42);
  optim::SGD<float> sgd(m.params(), {.lr = 0.02});
  Tape<float> tape;
  result r{};
  std::vector<double> times;
  std::size_t calls = 0;
  for (int s = 0; s < steps; ++s) {
    tape.reset();
    sgd.zero_grad();
    calls = 0;
    const auto t0 = std::chrono::steady_clock::now();
    Var<float> x = tape.constant(data.x);
    Var<float> h = sequential<P>(
        depth,
        [&m, &calls](std::size_t i, const Var<float>& v) -> Var<float> {
          ++calls;
          return v + relu(matmul(m.W[i], v) + m.b[i]);
        },
        x);
    Var<float> loss = cross_entropy(matmul(m.head, h) + m.head_b, data.labels);
    tape.backward(loss);
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    r.losses.push_back(loss.item());
    r.peak = std::max(r.peak, tape.peak_bytes());
    if (s == 0)
      for (auto* p : m.params()) r.first_grads.push_back(p->grad());
    sgd.step();
  }
  r.step_calls = calls;
  std::sort(times.begin() + 2, times.end());  // the first two steps warm the pool and caches
  r.median_ms = times[2 + (times.size() - 2) / 2];
  return r;
}

bool same_bits(const std::vector<Mat>& a, const std::vector<Mat>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].size() != b[i].size() || std::memcmp(a[i].data(), b[i].data(), sizeof(float) * a[i].size()) != 0) return false;
  return true;
}

}  // namespace

int main() {
  const task data = make_task(7);
  std::printf("ckpt checkpoint demo: residual MLP, %d layers of width %d, batch %d, %d classes, float, %d SGD steps\n\n", depth,
              width, batch, classes, steps);
  const result none = train<policy::none>(data);
  struct row {
    const char* name;
    result r;
  };
  std::vector<row> rows{{"none", none},
                        {"every<4>", train<policy::every<4>>(data)},
                        {"sqrt_n", train<policy::sqrt_n>(data)},
                        {"binomial<4>", train<policy::binomial<4>>(data)},
                        {"selective<matmul>", train<policy::selective<save::matmul>>(data)}};
  std::printf("loss: step 1 %.4f -> step %d %.4f\n\n", none.losses.front(), steps, none.losses.back());
  std::printf("%-18s %10s %8s %12s %8s %11s %10s\n", "policy", "step [ms]", "time x", "peak [KiB]", "mem x", "step calls",
              "same grads");
  bool all_same = true;
  for (const auto& [name, r] : rows) {
    const bool same = same_bits(r.first_grads, none.first_grads) && r.losses == none.losses;
    all_same = all_same && same;
    std::printf("%-18s %10.2f %8.2f %12.0f %8.2f %11zu %10s\n", name, r.median_ms, r.median_ms / none.median_ms,
                static_cast<double>(r.peak) / 1024.0, static_cast<double>(r.peak) / static_cast<double>(none.peak), r.step_calls,
                same ? "yes" : "NO");
  }
  std::printf("\n%s\n", all_same ? "every policy gave bit-for-bit the gradients and losses of `none`"
                                 : "MISMATCH: a policy changed the gradients");
  return all_same ? 0 : 1;
}
