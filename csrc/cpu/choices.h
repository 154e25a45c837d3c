// The call signatures the extension's op kernels serve without asking Python: filled by Python when the
// extension's own code served a call (remember), emptied whenever something that decides the choices
// changes (forget: a backend registered or forced, the priorities, the tuning settings). Used by the
// conv (op.h), attention (attention_op.h) and norm (norm_op.h) operators.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace aqcf {

// signature -> what serves it; thread-safe (autograd runs backward ops on its own threads). Bounded: a
// program that keeps changing shapes (variable-size inference) stops adding signatures at kMaxChoices,
// and the calls it would have served go through Python, as before they were remembered.
template <typename Choice>
class RememberedChoices {
 public:
  static constexpr size_t kMaxChoices = 4096;

  void remember(std::string key, Choice choice) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (choices_.size() >= kMaxChoices && choices_.find(key) == choices_.end()) return;
    choices_[std::move(key)] = std::move(choice);
  }
  std::optional<Choice> recall(const std::string& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = choices_.find(key);
    if (it == choices_.end()) return std::nullopt;
    return it->second;
  }
  void forget() {
    std::lock_guard<std::mutex> lock(mutex_);
    choices_.clear();
  }
  int64_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(choices_.size());
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<std::string, Choice> choices_;
};

// The backend Python forces with aqcf_kernels.backends.use(), announced on entering and leaving it
// (set_forced_backend). A part of every signature rather than a reason to forget every choice: a
// benchmark or a training loop that enters use() around each step then keeps the choices it made
// under it, where each entry and exit used to send the next calls of every signature back through
// Python (~75 us of host time a call on CPU). Read under a lock: autograd's threads make signatures
// while the main thread may enter or leave use().
class ForcedBackend {
 public:
  void set(std::string name) {
    std::lock_guard<std::mutex> lock(mutex_);
    name_ = std::move(name);
  }
  void append_to(std::string& key) const {
    std::lock_guard<std::mutex> lock(mutex_);
    key.append(name_);
  }

 private:
  mutable std::mutex mutex_;
  std::string name_;
};

inline ForcedBackend& forced_backend() {
  static ForcedBackend* forced = new ForcedBackend();  // never destroyed: read by threads at exit
  return *forced;
}

// The start of every signature: `kind`, then what every choice depends on that is not in the call's
// arguments: the backend forced by use() (above) or by AQCF_BACKEND (which users and tests change with
// the environment), the device, and whether deterministic algorithms are on (torch.use_deterministic_algorithms).
inline std::string signature_start(std::string_view kind, const at::Device& device) {
  std::string key;
  key.reserve(256);
  key.append(kind).push_back('|');
  forced_backend().append_to(key);
  key.push_back('|');
  const char* forced = std::getenv("AQCF_BACKEND");
  key.append(forced ? forced : "").push_back('|');
  key.append(device.str()).push_back('|');
  // Python answers deterministic algorithms with the heuristic's pick, not a measured one (tuning.measuring).
  key.push_back(at::globalContext().deterministicAlgorithms() ? 'D' : '-');
  key.push_back('|');
  return key;
}

}  // namespace aqcf
