// Linked into the portable build only (BNC_PORTABLE_LINK=ON, set by .ci/build-wheel): with
// libstdc++ linked statically, these two keep the extension's references to the C library at
// versions that glibc 2.17 already has, so that a wheel built on a new Linux loads on old ones
// (manylinux2014). docs/packaging.md says why each is needed and how the tag is checked.
#include <pthread.h>

extern "C" {

// libstdc++ (its headers and libstdc++.a) reads this glibc >= 2.32 flag to skip atomic reference
// counts in single-threaded processes. 0 always takes the atomic path: correct in any process.
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

// glibc 2.34 moved pthread_once from libpthread into libc under a new version; the old version
// is the same function, in libpthread before 2.34 and in libc since. -Wl,--wrap=pthread_once
// sends every call here.
int bnc_pthread_once_glibc_2_2_5(pthread_once_t* once, void (*init)(void));
__asm__(".symver bnc_pthread_once_glibc_2_2_5, pthread_once@GLIBC_2.2.5");
__attribute__((visibility("hidden"))) int __wrap_pthread_once(pthread_once_t* once,
                                                              void (*init)(void)) {
  return bnc_pthread_once_glibc_2_2_5(once, init);
}

}  // extern "C"
