#include "threadpool.hpp"

#if defined(_WIN32)
#include <immintrin.h>  // _mm_pause
#else
#include <pthread.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#include "sdpa/sdpa.hpp"

namespace sdpa {
namespace {

// Before blocking on a condition variable, a thread spins this long: waking a sleeping thread
// costs tens of microseconds on a VM, more than a small attention call takes, while calls in a
// loop (a model's layers) come back well within this time. (OpenMP runtimes spin likewise.)
constexpr auto kSpin = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
  _mm_pause();
#elif defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or kSpin has passed; returns done().
template <typename F>
bool spin_until(F&& done) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (done()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > deadline) return done();
  }
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  try {
    for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  } catch (const std::exception& e) {  // e.g. the OS refused a thread: stop the ones started
    const size_t started = workers_.size() + 1;
    stop_workers();
    throw std::runtime_error("sdpa could not start " + std::to_string(n_threads) +
                             " threads (the system refused after " + std::to_string(started) +
                             ": " + e.what() + "); use sdpa.set_num_threads with fewer");
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::drain() {
  for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < n_;) {
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_, std::memory_order_relaxed);  // stop handing out items
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    spin_until([&] { return stop_.load() || generation_.load() != seen; });
    {
      std::unique_lock<std::mutex> lk(mu_);
      wake_.wait(lk, [&] { return stop_ || (generation_ != seen && enlisted_ > 0); });
      if (stop_) return;
      seen = generation_;
      --enlisted_;
    }
    drain();
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int max_threads, const std::function<void(int64_t)>& fn) {
  const int helpers = static_cast<int>(
      std::min<int64_t>({static_cast<int64_t>(workers_.size()), max_threads - 1, n - 1}));
  std::unique_lock<std::mutex> job(job_mutex_, std::defer_lock);
  if (helpers <= 0 || !job.try_lock()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    pending_ = helpers;
    enlisted_ = helpers;
    ++generation_;
  }
  if (helpers == static_cast<int>(workers_.size()))
    wake_.notify_all();
  else
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
  drain();
  spin_until([&] { return pending_.load() == 0; });
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [&] { return pending_ == 0; });
    enlisted_ = 0;
    fn_ = nullptr;
    error = error_;
  }
  if (error) std::rethrow_exception(error);
}

namespace {

std::mutex g_mutex;
std::shared_ptr<ThreadPool> g_pool;
int g_threads = 1;

#if defined(_WIN32)
// No fork() on Windows: the pool never outlives its process's threads.
int process_id() { return 0; }
#else
int process_id() { return static_cast<int>(getpid()); }

void prepare_fork() { g_mutex.lock(); }
void parent_after_fork() { g_mutex.unlock(); }
void child_after_fork() {
  // The parent's workers do not exist here: never join or touch them. The pool object is leaked
  // on purpose (its destructor would wait for threads that will never answer).
  if (g_pool) new std::shared_ptr<ThreadPool>(std::move(g_pool));
  g_mutex.unlock();
}

struct ForkHandlers {
  ForkHandlers() { pthread_atfork(prepare_fork, parent_after_fork, child_after_fork); }
};
ForkHandlers g_fork_handlers;
#endif
int g_pid = 0;

}  // namespace

std::shared_ptr<ThreadPool> global_pool() {
  std::lock_guard<std::mutex> lk(g_mutex);
  if (g_pool && g_pid != process_id()) new std::shared_ptr<ThreadPool>(std::move(g_pool));
  if (!g_pool || g_pool->size() != g_threads) {
    g_pool = std::make_shared<ThreadPool>(g_threads);
    g_pid = process_id();
  }
  return g_pool;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_mutex);
  g_threads = std::max(1, n);
}

int get_num_threads() {
  std::lock_guard<std::mutex> lk(g_mutex);
  return g_threads;
}

}  // namespace sdpa
