// Counts the ATen operations a process issues, for bench/aten_ops.py: preloaded
// (LD_PRELOAD) into a PyTorch or a `lanner` (torch build) process with ATEN_OPS_OUT set, it
// registers a global RecordFunction callback and, at exit, writes one line to that file:
// "<issued operations> <all operations>", then one line per operation name: "<issued> <name>".
//
// "Issued" operations are those the framework itself calls: the outermost ATen call on a
// thread (an operation PyTorch's Python code or Lanner's burn-tch calls), and the ATen calls
// made directly inside one of PyTorch's autograd backward nodes (what its backward pass
// issues; burn's autodiff calls ATen from Rust, so its backward operations are outermost
// calls). The autograd engine's own records ("autograd::...") are not operations; the ATen
// calls directly inside them (e.g. summing the gradients of a tensor used twice) are issued
// ones. Calls nested
// inside another operation (ATen's own decompositions, e.g. conv2d ->
// convolution -> _convolution -> mkldnn_convolution) count only in "all". On a GPU every
// issued operation costs at least one kernel launch and the host time to dispatch it.
#include <ATen/record_function.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace {

std::atomic<long long> issued{0};
std::atomic<long long> all{0};
std::mutex names_lock;
std::map<std::string, long long> *names = new std::map<std::string, long long>();  // never freed
// The scopes of the records open on this thread, innermost last.
thread_local std::vector<at::RecordScope> open;

std::unique_ptr<at::ObserverContext> on_enter(const at::RecordFunction &record) {
  const auto scope = record.scope();
  // PyTorch's autograd engine also records its own bookkeeping with function scope
  // ("autograd::engine::evaluate_function: ..."): not an ATen operation.
  const bool aten = std::string_view(record.name()).rfind("autograd::", 0) != 0;
  if (scope == at::RecordScope::FUNCTION && aten) {
    all.fetch_add(1, std::memory_order_relaxed);
    if (open.empty() || open.back() == at::RecordScope::BACKWARD_FUNCTION) {
      issued.fetch_add(1, std::memory_order_relaxed);
      std::lock_guard<std::mutex> guard(names_lock);
      (*names)[record.name()] += 1;
    }
  }
  // The engine's records are framework code, like a backward node: the ATen calls directly
  // inside them (accumulating a gradient used twice, for one) are issued by the framework.
  open.push_back(aten ? scope : at::RecordScope::BACKWARD_FUNCTION);
  return nullptr;
}

void on_exit(const at::RecordFunction &, at::ObserverContext *) {
  if (!open.empty()) {
    open.pop_back();
  }
}

const char *output() { return std::getenv("ATEN_OPS_OUT"); }

__attribute__((constructor)) void start() {
  if (output() == nullptr) {
    return;
  }
  at::addGlobalCallback(
      at::RecordFunctionCallback(on_enter, on_exit)
          .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
}

__attribute__((destructor)) void finish() {
  const char *path = output();
  if (path == nullptr) {
    return;
  }
  if (FILE *file = std::fopen(path, "w")) {
    std::fprintf(file, "%lld %lld\n", issued.load(), all.load());
    std::lock_guard<std::mutex> guard(names_lock);
    for (const auto &[name, n] : *names) {
      std::fprintf(file, "%lld %s\n", n, name.c_str());
    }
    std::fclose(file);
  }
}

}  // namespace
