// Thread count shared by the kernel sources: included inside their anonymous namespaces, after <algorithm>,
// <cstdlib> and <sched.h>.
#pragma once

// IXC25_KERNEL_THREADS, else the CPUs this process may run on, at most 8
inline int KernelThreads() {
  const char *env = std::getenv("IXC25_KERNEL_THREADS");
  int n = env ? std::atoi(env) : 0;
  if (n <= 0) {
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
    n = std::min(n, 8);
  }
  return std::max(1, n);
}
