// peer_ckpt: ckpt's side of the comparison with PyTorch (bench/peers/README.md).
//
//   peer_ckpt export DIR [model options]   generates the initial values, writes them to
//       DIR/params/*.npy and DIR/meta.json, runs one step per policy and writes its loss and
//       every gradient to DIR/ckpt/<policy>/{loss,grad_<name>}.npy; prints a JSON line.
//   peer_ckpt time DIR --policy P [--warmup 3] [--reps 15]   loads DIR/params, times P's step
//       and prints a JSON line with the step times, the tape's peak bytes and peak RSS.
//   peer_ckpt empty   prints the peak RSS of a process that does nothing (the baseline).
//
// Model options: --model mlp|lora|lora_res --depth L --width W --batch N --rank R --alpha A --seed S;
// export also takes --policies a,b,c (default: all of the model's).
//
// Files: NumPy .npy version 1.0, little-endian float32 ('<f4'), fortran_order True, 2-D: a
// column-major w x n matrix is written as it lies in memory, and numpy.load gives back the
// w x n array with the same indices. The loss is a 1 x 1 array.
#include "peer_models.hpp"

#include <malloc.h>
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

// OpenBLAS's own (weak: null when the BLAS is another one).
extern "C" int openblas_get_num_threads(void) __attribute__((weak));
extern "C" char* openblas_get_corename(void) __attribute__((weak));

namespace fs = std::filesystem;
using peers::Mat;

namespace {

// ------------------------------------------------------------------ .npy

void write_npy(const fs::path& path, const float* data, long rows, long cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': True, 'shape': (" + std::to_string(rows) + ", " + std::to_string(cols) + "), }";
  const std::size_t total = 10 + header.size() + 1;  // magic(6) version(2) len(2), header, '\n'
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot write " + path.string());
  const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(reinterpret_cast<const char*>(magic), 8);
  const unsigned short len = static_cast<unsigned short>(header.size());
  const unsigned char le[2] = {static_cast<unsigned char>(len & 0xff), static_cast<unsigned char>(len >> 8)};
  f.write(reinterpret_cast<const char*>(le), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(sizeof(float) * rows * cols));
  if (!f) throw std::runtime_error("write failed: " + path.string());
}

/// Reads what write_npy writes (and nothing else: '<f4', fortran order, 2-D).
Mat read_npy(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path.string());
  unsigned char pre[10];
  f.read(reinterpret_cast<char*>(pre), 10);
  if (!f || std::memcmp(pre, "\x93NUMPY", 6) != 0 || pre[6] != 1) throw std::runtime_error(path.string() + ": not a .npy v1 file");
  std::string header(static_cast<std::size_t>(pre[8] | (pre[9] << 8)), '\0');
  f.read(header.data(), static_cast<std::streamsize>(header.size()));
  if (header.find("'<f4'") == std::string::npos || header.find("'fortran_order': True") == std::string::npos)
    throw std::runtime_error(path.string() + ": expected '<f4' in Fortran order");
  long rows = 0, cols = 0;
  const auto s = header.find("'shape': (");
  if (s == std::string::npos || std::sscanf(header.c_str() + s + 10, "%ld, %ld", &rows, &cols) != 2)
    throw std::runtime_error(path.string() + ": expected a 2-D shape");
  Mat m(rows, cols);
  f.read(reinterpret_cast<char*>(m.data()), static_cast<std::streamsize>(sizeof(float) * rows * cols));
  if (!f) throw std::runtime_error(path.string() + ": truncated");
  return m;
}

// ------------------------------------------------------------------ memory

long max_rss_kb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;  // kilobytes on Linux
}
long status_kb(const char* key) {  // "VmRSS" (now) or "VmHWM" (this address space's peak)
  std::ifstream f("/proc/self/status");
  const std::string k = std::string(key) + ":";
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(k, 0) == 0) return std::atol(line.c_str() + k.size());
  return -1;
}
long current_rss_kb() { return status_kb("VmRSS"); }

/// CPU time of the whole process (all threads), milliseconds: what a step costs whatever else
/// the machine runs; the wall clock is what is asked, this is what explains it under load.
double process_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// ------------------------------------------------------------------ policies

template <class Model>
using step_fn = float (*)(Model&, ckpt::Tape<float>&);

template <class Model>
step_fn<Model> policy_step(const std::string& p) {
  using namespace ckpt;
  if (p == "none") return &peers::step<policy::none, Model>;
  if (p == "per_block") return &peers::step<policy::every<1>, Model>;
  if (p == "every4") return &peers::step<policy::every<4>, Model>;
  if (p == "sqrt_n") return &peers::step<policy::sqrt_n, Model>;
  if (p == "binomial4") return &peers::step<policy::binomial<4>, Model>;
  if (p == "selective_matmul") return &peers::step<policy::selective<save::matmul>, Model>;
  throw std::runtime_error("unknown policy '" + p + "' (none, per_block, every4, sqrt_n, binomial4, selective_matmul)");
}

std::vector<std::string> policies_of(const std::string& model) {
  if (model == "lora") return {"none", "per_block", "every4", "sqrt_n", "binomial4"};
  if (model == "lora_res") return {"none", "per_block", "sqrt_n", "binomial4"};
  return {"none", "every4", "sqrt_n", "binomial4", "selective_matmul"};
}

// ------------------------------------------------------------------ options

struct options {
  std::string mode, dir, policy = "none", policies;  // policies: export's comma-separated list
  peers::config cfg;
  int warmup = 3, reps = 15;
};

options parse(int argc, char** argv) {
  options o;
  if (argc < 2) throw std::runtime_error("usage: peer_ckpt export|time|empty [DIR] [options]");
  o.mode = argv[1];
  int i = 2;
  if (o.mode != "empty") {
    if (argc < 3) throw std::runtime_error("peer_ckpt " + o.mode + ": DIR missing");
    o.dir = argv[2];
    i = 3;
  }
  for (; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) throw std::runtime_error("option " + k + " needs a value");
    const std::string v = argv[++i];
    if (k == "--model") o.cfg.model = v;
    else if (k == "--depth") o.cfg.depth = std::stoi(v);
    else if (k == "--width") o.cfg.width = std::stoi(v);
    else if (k == "--batch") o.cfg.batch = std::stoi(v);
    else if (k == "--rank") o.cfg.rank = std::stoi(v);
    else if (k == "--alpha") o.cfg.alpha = std::stod(v);
    else if (k == "--seed") o.cfg.seed = std::stoull(v);
    else if (k == "--policy") o.policy = v;
    else if (k == "--policies") o.policies = v;
    else if (k == "--warmup") o.warmup = std::stoi(v);
    else if (k == "--reps") o.reps = std::stoi(v);
    else throw std::runtime_error("unknown option " + k);
  }
  if (o.cfg.model != "mlp" && o.cfg.model != "lora" && o.cfg.model != "lora_res")
    throw std::runtime_error("--model must be mlp, lora or lora_res");
  return o;
}

/// The model description in DIR/meta.json, read back by `time` (a flat JSON object).
void write_meta(const fs::path& dir, const peers::config& c) {
  std::ofstream f(dir / "meta.json");
  f << "{\"model\": \"" << c.model << "\", \"depth\": " << c.depth << ", \"width\": " << c.width << ", \"batch\": " << c.batch
    << ", \"rank\": " << c.rank << ", \"alpha\": " << c.alpha << ", \"scale\": " << static_cast<float>(c.alpha / c.rank)
    << ", \"seed\": " << c.seed << ", \"layout\": \"features x batch, column-major; npy fortran_order\"}\n";
}
peers::config read_meta(const fs::path& dir) {
  std::ifstream f(dir / "meta.json");
  if (!f) throw std::runtime_error("cannot read " + (dir / "meta.json").string() + " (run export first)");
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string s = ss.str();
  auto field = [&](const char* k) -> std::string {
    const std::string key = std::string("\"") + k + "\": ";
    auto p = s.find(key);
    if (p == std::string::npos) throw std::runtime_error(std::string("meta.json: no ") + k);
    p += key.size();
    if (s[p] == '"') return s.substr(p + 1, s.find('"', p + 1) - p - 1);
    return s.substr(p, s.find_first_of(",}", p) - p);
  };
  peers::config c;
  c.model = field("model");
  c.depth = std::stoi(field("depth"));
  c.width = std::stoi(field("width"));
  c.batch = std::stoi(field("batch"));
  c.rank = std::stoi(field("rank"));
  c.alpha = std::stod(field("alpha"));
  c.seed = std::stoull(field("seed"));
  return c;
}

std::string param_file(const std::string& name, int i) { return name == "x" ? "x.npy" : peers::indexed(name.c_str(), static_cast<std::size_t>(i)) + ".npy"; }

int threads_used() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

std::string env_or(const char* k, const char* d) {
  const char* v = std::getenv(k);
  return v ? v : d;
}

void print_common(std::FILE* out, const peers::config& c) {
  std::fprintf(out,
               "\"side\": \"ckpt\", \"model\": \"%s\", \"depth\": %d, \"width\": %d, \"batch\": %d, \"rank\": %d, "
               "\"gemm_engine\": \"%s\", \"eigen_threads\": %d, \"openmp\": %s, \"omp_num_threads_env\": \"%s\", "
               "\"openblas_num_threads_env\": \"%s\", \"openblas_threads\": %d, \"openblas_core\": \"%s\"",
               c.model.c_str(), c.depth, c.width, c.batch, c.model != "mlp" ? c.rank : 0, ckpt::backend::cpu::gemm_engine(),
               Eigen::nbThreads(),
#if defined(_OPENMP)
               "true",
#else
               "false",
#endif
               env_or("OMP_NUM_THREADS", "").c_str(), env_or("OPENBLAS_NUM_THREADS", "").c_str(),
               openblas_get_num_threads ? openblas_get_num_threads() : 0, openblas_get_corename ? openblas_get_corename() : "");
}

// ------------------------------------------------------------------ modes

template <class Model>
int run_export(const options& o, Model& m, int nudged) {
  const fs::path dir(o.dir);
  std::printf("{");
  print_common(stdout, o.cfg);
  std::printf(", \"biases_nudged_off_kinks\": %d", nudged);
  std::printf(", \"policies\": {");
  bool first = true;
  std::vector<std::string> list = policies_of(o.cfg.model);
  if (!o.policies.empty()) {
    list.clear();
    std::stringstream ss(o.policies);
    for (std::string p; std::getline(ss, p, ',');) list.push_back(p);
  }
  for (const auto& p : list) {
    ckpt::Tape<float> tape;
    const float loss = policy_step<Model>(p)(m, tape);
    const fs::path pd = dir / "ckpt" / p;
    fs::create_directories(pd);
    write_npy(pd / "loss.npy", &loss, 1, 1);
    for (const auto& [name, param] : m.trainable()) {
      const auto g = param->grad();
      write_npy(pd / ("grad_" + name + ".npy"), g.data(), g.rows(), g.cols());
    }
    std::printf("%s\"%s\": {\"loss\": %.9g, \"tape_peak_bytes\": %zu, \"gemms\": %zu}", first ? "" : ", ", p.c_str(), loss,
                tape.peak_bytes(), tape.counters().gemms);
    first = false;
  }
  std::printf("}}\n");
  return 0;
}

template <class Model>
int run_time(const options& o, Model& m, long rss_before_model) {
  const auto step = policy_step<Model>(o.policy);
  {  // initialise what a step uses (as torch_peer.py's tiny_warmup) before the baseline
    ckpt::Tape<float> t;
    ckpt::Parameter<float> a(Mat(Mat::Ones(8, 8)));
    ckpt::Var<float> loss = ckpt::mean(ckpt::square(ckpt::relu(ckpt::matmul(a, t.constant(Mat(Mat::Ones(8, 8)))))));
    t.backward(loss);
  }
  ckpt::Tape<float> tape;
  malloc_trim(0);  // hand the loading's freed buffers back, so that the steps' growth is theirs (as torch_peer.py)
  const long rss_loaded = current_rss_kb();
  const long maxrss_loaded = max_rss_kb();
  std::vector<double> ms, cpu;
  long maxrss_first = 0;  // after the first step: before the allocator has seen a second one
  float loss = 0;
  for (int r = 0; r < o.warmup + o.reps; ++r) {
    const double c0 = process_cpu_ms();
    const auto t0 = std::chrono::steady_clock::now();
    loss = step(m, tape);
    const auto t1 = std::chrono::steady_clock::now();
    const double c1 = process_cpu_ms();
    if (r == 0) maxrss_first = max_rss_kb();
    if (r >= o.warmup) {
      ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      cpu.push_back(c1 - c0);
    }
  }
  const long maxrss_end = max_rss_kb();
  const double median = median_of(ms);
  std::printf("{");
  print_common(stdout, o.cfg);
  std::printf(
      ", \"policy\": \"%s\", \"warmup\": %d, \"reps\": %d, \"loss\": %.9g, \"median_ms\": %.6g, \"min_ms\": %.6g, "
      "\"cpu_median_ms\": %.6g, \"tape_peak_bytes\": %zu, \"gemms\": %zu, \"rss_start_kb\": %ld, \"rss_loaded_kb\": %ld, \"maxrss_loaded_kb\": %ld, "
      "\"maxrss_first_kb\": %ld, \"maxrss_end_kb\": %ld, \"hwm_end_kb\": %ld, \"times_ms\": [",
      o.policy.c_str(), o.warmup, o.reps, loss, median, *std::min_element(ms.begin(), ms.end()), median_of(cpu), tape.peak_bytes(), tape.counters().gemms, rss_before_model,
      rss_loaded, maxrss_loaded, maxrss_first, maxrss_end, status_kb("VmHWM"));
  for (std::size_t i = 0; i < ms.size(); ++i) std::printf("%s%.6g", i ? ", " : "", ms[i]);
  std::printf("]}\n");
  return 0;
}

template <class Model>
int dispatch(const options& o) {
  const long rss_start = current_rss_kb();
  if (o.mode == "export") {
    const fs::path dir(o.dir);
    fs::create_directories(dir / "params");
    write_meta(dir, o.cfg);
    const auto v = peers::init_values::generate(o.cfg);
    auto get = [&](const std::string& name, int i) -> Mat {
      const Mat& m = v.get(name, i);
      write_npy(dir / "params" / param_file(name, i), m.data(), m.rows(), m.cols());
      return m;
    };
    Model m(o.cfg, get);
    return run_export(o, m, v.nudged);
  }
  const fs::path pd = fs::path(o.dir) / "params";
  auto get = [&](const std::string& name, int i) -> Mat { return read_npy(pd / param_file(name, i)); };
  Model m(o.cfg, get);
  return run_time(o, m, rss_start);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    options o = parse(argc, argv);
    if (o.mode == "empty") {
      std::printf("{\"side\": \"ckpt\", \"mode\": \"empty\", \"maxrss_kb\": %ld, \"rss_kb\": %ld, \"hwm_kb\": %ld, \"eigen_threads\": %d, \"omp_threads\": %d}\n",
                  max_rss_kb(), current_rss_kb(), status_kb("VmHWM"), Eigen::nbThreads(), threads_used());
      return 0;
    }
    if (o.mode == "time") {
      o.cfg = read_meta(o.dir);  // the model is the one exported to DIR
    } else if (o.mode != "export") {
      throw std::runtime_error("unknown mode " + o.mode + " (export, time, empty)");
    }
    if (o.cfg.model == "lora") return dispatch<peers::lora>(o);
    if (o.cfg.model == "lora_res") return dispatch<peers::lora_res>(o);
    return dispatch<peers::mlp>(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "peer_ckpt: %s\n", e.what());
    return 1;
  }
}
