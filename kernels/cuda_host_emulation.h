// cuda_host_emulation.h -- compile a CUDA kernel file as ordinary C++ and run it on the CPU.
//
//   g++ -std=c++17 -shared -fPIC -x c++ -include cuda_host_emulation.h kernel.cu -o kernel.so
//
// What it provides: the qualifiers (__global__, __device__, ...), dim3, the built-in
// variables threadIdx / blockIdx / blockDim / gridDim, atomicAdd, the warp shuffles
// __shfl_sync / __shfl_up_sync / __shfl_down_sync / __shfl_xor_sync, __syncthreads,
// __float_as_uint / __uint_as_float, and a launcher that plays the whole grid.
//
// How threads run. A GPU runs thousands of threads at once; here they run ONE AFTER
// ANOTHER on one CPU core. Blocks run in order. Inside a block every thread is a
// "fiber" (a ucontext with its own small stack): it runs without interruption until it
// reaches a barrier -- a shuffle or __syncthreads -- and there it parks. When every
// thread of the block has parked (or finished), the scheduler opens the barriers that
// are complete: a shuffle opens when all lanes named in its mask have parked at a
// shuffle; __syncthreads opens when every unfinished thread of the block waits at it.
// So the 32 lanes of a warp reach each shuffle in lockstep, as on the GPU, and a
// shuffle returns the value its source lane passed to that same shuffle.
//
// Limits -- what this emulation does NOT model:
//  * No parallelism, no races: atomicAdd is a plain read-add-write, which is enough
//    because a thread is never switched out in the middle of one. A kernel that forgot
//    an atomic still gives the right answer here: review races on the GPU source.
//  * Threads switch only at barriers, so code that spins on memory written by another
//    thread (a hand-made lock, a flag) never sees the other thread run: a deadlock.
//  * __syncthreads opens only when every thread of the block that has not returned
//    waits at it (as CUDA requires); one missing thread is reported as a deadlock.
//  * A shuffle must be called by all lanes its mask names; a lane that has returned or
//    waits at __syncthreads instead is reported as an error, not left undefined.
//  * Only shared memory via static __shared__ variables, which becomes plain static
//    storage: correct because blocks run one after another. No dynamic shared memory,
//    no textures, no cooperative groups, no __syncwarp, no warp votes.
//  * No memory checking: an out-of-bounds index reads garbage or crashes the whole
//    process (the GPU's "illegal memory access"). On a GPU, compute-sanitizer finds it.
//  * Floating point is the CPU's: results match the GPU within rounding, not bit for bit
//    (the GPU fuses multiply-adds; atomics add in a different order).
//  * No CUDA headers (cuda_fp16.h, ...) and no inline PTX asm: a kernel file guards such
//    lines with #ifdef __CUDA_ARCH__ (defined by NVRTC/nvcc, never by g++) and gives a
//    plain C++ version in the #else branch.
//
// Errors inside a launch (a broken shuffle, a deadlock, an unknown kernel) stop the
// launch; emu_launch returns non-zero and emu_last_error() says what happened.
#pragma once
#define CUDA_HOST_EMULATION 1

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

using std::floor;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;  // set before a thread runs
constexpr int warpSize = 32;

inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }

// One thread at a time: a read-add-write cannot be interrupted, so it is atomic.
template <typename T> inline T atomicAdd(T* address, T val) { T old = *address; *address = old + val; return old; }

namespace emu {

enum class State { Runnable, AtShuffle, AtSync, Done };

struct Thread {
  ucontext_t context;
  dim3 index;
  State state = State::Runnable;
  unsigned int mask = 0;    // lanes named by the shuffle this thread parked at
  unsigned char posted[8];  // the value it passed to that shuffle
  unsigned char seen[8];    // snapshot of `posted` taken when the shuffle opened
};

struct Block {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  std::vector<char> stacks;
  int current = 0;
  const std::function<void()>* body = nullptr;
};

inline Block* block = nullptr;    // the block being played
inline std::string last_error;    // set when a launch fails
constexpr size_t kStackBytes = 64 * 1024;

inline void park(State s) {  // called by a thread: hand control back to the scheduler
  block->threads[block->current].state = s;
  swapcontext(&block->threads[block->current].context, &block->scheduler);
}

inline void thread_main() {
  (*block->body)();
  block->threads[block->current].state = State::Done;  // uc_link returns to the scheduler
}

// Open the barriers that are complete; false (and last_error set) when none can open.
inline bool open_barriers() {
  std::vector<Thread>& th = block->threads;
  const int n = static_cast<int>(th.size());
  bool all_at_sync = true, any_live = false;
  for (const Thread& t : th) {
    if (t.state == State::Done) continue;
    any_live = true;
    all_at_sync = all_at_sync && t.state == State::AtSync;
  }
  if (!any_live) return true;
  if (all_at_sync) {
    for (Thread& t : th) if (t.state == State::AtSync) t.state = State::Runnable;
    return true;
  }
  bool opened = false;
  for (int warp = 0; warp * 32 < n; ++warp) {
    bool ready = false, complete = true;
    for (int lane = 0; lane < 32 && warp * 32 + lane < n; ++lane) {
      const Thread& t = th[warp * 32 + lane];
      if (t.state != State::AtShuffle) continue;
      ready = true;
      for (int src = 0; src < 32; ++src) {
        if (!(t.mask >> src & 1u)) continue;
        const int other = warp * 32 + src;
        if (other >= n || th[other].state == State::Done) {
          last_error = "lane " + std::to_string(lane) + " of warp " + std::to_string(warp) +
                       " called a shuffle whose mask names lane " + std::to_string(src) +
                       ", which " + (other >= n ? "does not exist" : "has already returned");
          return false;
        }
        complete = complete && th[other].state == State::AtShuffle;
      }
    }
    if (!ready || !complete) continue;
    for (int lane = 0; lane < 32 && warp * 32 + lane < n; ++lane) {
      Thread& t = th[warp * 32 + lane];
      if (t.state != State::AtShuffle) continue;
      std::memcpy(t.seen, t.posted, sizeof t.seen);
      t.state = State::Runnable;
      opened = true;
    }
  }
  if (!opened) last_error = "deadlock: threads wait at __syncthreads and at shuffles that cannot complete";
  return opened;
}

// Play one block: run every runnable thread until it parks, open barriers, repeat.
inline bool run_block(const std::function<void()>& body) {
  Block b;
  const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  b.threads.resize(n);
  b.stacks.resize(static_cast<size_t>(n) * kStackBytes);
  b.body = &body;
  block = &b;
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[i];  // linear id i = x + y*bx + z*bx*by, as CUDA numbers lanes
    t.index.x = i % blockDim.x;
    t.index.y = i / blockDim.x % blockDim.y;
    t.index.z = i / (blockDim.x * blockDim.y);
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = &b.stacks[static_cast<size_t>(i) * kStackBytes];
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, thread_main, 0);
  }
  for (bool live = true; live;) {
    live = false;
    for (int i = 0; i < n; ++i) {
      if (b.threads[i].state != State::Runnable) continue;
      b.current = i;
      threadIdx = b.threads[i].index;
      swapcontext(&b.scheduler, &b.threads[i].context);
    }
    for (const Thread& t : b.threads) live = live || t.state != State::Done;
    if (live && !open_barriers()) { block = nullptr; return false; }
  }
  block = nullptr;
  return true;
}

// The kernel launch `kernel<<<grid, block>>>(...)`: every block, one after another.
inline bool launch(dim3 grid, dim3 threads, const std::function<void()>& body) {
  last_error.clear();
  if (threads.x * threads.y * threads.z == 0 || threads.x * threads.y * threads.z > 1024) {
    last_error = "block size must be 1..1024 threads";
    return false;
  }
  gridDim = grid;
  blockDim = threads;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
        if (!run_block(body)) return false;
      }
  return true;
}

// Shuffles: park with our value, wake up when the whole mask has posted, read `src`.
template <typename T> inline T shuffle_from(unsigned int mask, T var, int src_lane) {
  static_assert(sizeof(T) <= 8, "the emulated shuffle moves at most 8 bytes");
  Thread& me = block->threads[block->current];
  me.mask = mask;
  std::memcpy(me.posted, &var, sizeof(T));
  park(State::AtShuffle);
  const int my_lane = block->current % 32;
  if (src_lane < 0 || src_lane >= 32 || !(mask >> src_lane & 1u)) return var;  // CUDA: undefined; keep ours
  T out;
  std::memcpy(&out, block->threads[block->current - my_lane + src_lane].seen, sizeof(T));
  return out;
}

inline int lane_id() { return block->current % 32; }

// Registry of kernels callable from Python by name ("msda_forward<float>").
struct Entry {
  std::string name;
  std::function<void(void**)> call;  // unpacks cuLaunchKernel-style argument pointers
};
inline std::vector<Entry>& registry() { static std::vector<Entry> r; return r; }

template <typename... Args, size_t... I>
inline void call_unpacked(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<typename std::remove_reference<Args>::type*>(args[I])...);
}

struct Registration {
  template <typename... Args> Registration(const char* name, void (*kernel)(Args...)) {
    registry().push_back({name, [kernel](void** args) {
      call_unpacked(kernel, args, std::index_sequence_for<Args...>{});
    }});
  }
};

}  // namespace emu

// Segment of `width` lanes (a power of two <= 32) that a lane belongs to, as in CUDA.
template <typename T> inline T __shfl_sync(unsigned int mask, T var, int src, int width = 32) {
  const int base = emu::lane_id() & ~(width - 1);
  return emu::shuffle_from(mask, var, base + (src & (width - 1)));
}
template <typename T> inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  const int lane = emu::lane_id(), src = lane + static_cast<int>(delta);
  return emu::shuffle_from(mask, var, src < (lane & ~(width - 1)) + width ? src : lane);
}
template <typename T> inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  const int lane = emu::lane_id(), src = lane - static_cast<int>(delta);
  return emu::shuffle_from(mask, var, src >= (lane & ~(width - 1)) ? src : lane);
}
template <typename T> inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = 32) {
  const int lane = emu::lane_id(), src = lane ^ lane_mask;
  return emu::shuffle_from(mask, var, src < (lane & ~(width - 1)) + width ? src : lane);
}
inline void __syncthreads() { emu::park(emu::State::AtSync); }

// In the kernel file, inside `#ifdef CUDA_HOST_EMULATION`: EMU_REGISTER_KERNEL(my_kernel<float>)
#define EMU_CAT2(a, b) a##b
#define EMU_CAT(a, b) EMU_CAT2(a, b)
#define EMU_REGISTER_KERNEL(...) \
  static emu::Registration EMU_CAT(emu_registration_, __COUNTER__)(#__VA_ARGS__, &__VA_ARGS__);

// C entry points for ctypes (include this header in ONE translation unit).
// grid and block hold (x, y, z); args[i] points at the i-th kernel argument.
extern "C" int emu_launch(const char* name, const unsigned int* grid, const unsigned int* block, void** args) {
  for (const emu::Entry& e : emu::registry()) {
    if (e.name != name) continue;
    const std::function<void()> body = [&] { e.call(args); };
    return emu::launch(dim3{grid[0], grid[1], grid[2]}, dim3{block[0], block[1], block[2]}, body) ? 0 : 1;
  }
  emu::last_error = std::string("no kernel registered under the name ") + name;
  return 2;
}
extern "C" const char* emu_last_error() { return emu::last_error.c_str(); }
