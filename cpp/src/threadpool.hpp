// One long-lived pool of worker threads; the calling thread works too.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace sdpa {

class ThreadPool {
 public:
  // A pool of `n_threads` in all: the caller plus n_threads - 1 workers.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(i) for every i in [0, n) on up to `max_threads` threads, handing out items one at a
  // time (dynamic scheduling), and returns when all are done. Which thread runs an item never
  // changes what the item computes. If the pool is busy with another caller's job, the call runs
  // inline on the caller instead of waiting (never nested, never deadlocked).
  void parallel_for(int64_t n, int max_threads, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void drain();
  void stop_workers();

  std::vector<std::thread> workers_;
  std::mutex job_mutex_;  // held by the caller that owns the current job

  std::mutex mu_;
  std::condition_variable wake_, done_;
  // Written under mu_; atomic so that threads may also spin on them without the lock.
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> pending_{0};  // workers still inside the current job
  int enlisted_ = 0;             // workers allowed to join the current job

  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

// The process-wide pool, created on first use with the configured thread count. After fork() the
// child gets a fresh pool (the parent's threads do not exist in the child).
// (set_num_threads and get_num_threads, in the driver API, configure its size.)
std::shared_ptr<ThreadPool> global_pool();

}  // namespace sdpa
