/* OpenMP shim: lets cbn build and run without an OpenMP compiler.
 *
 * Without _OPENMP every query answers as a serial runtime would, so the
 * Cython kernels (whose prange loops Cython already guards with
 * #ifdef _OPENMP) need no conditional code of their own.
 */
#ifndef CBN_OPENMP_H
#define CBN_OPENMP_H

#ifdef _OPENMP
#include <omp.h>
#define CBN_OPENMP_VERSION _OPENMP
#else
#define CBN_OPENMP_VERSION 0
static inline int omp_get_max_threads(void) { return 1; }
#endif

#if defined(_OPENMP) && (defined(__linux__) || defined(__APPLE__))
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
/* Path of the shared library that provides the OpenMP runtime we call. */
static inline const char *cbn_openmp_library(void)
{
    Dl_info info;
    if (dladdr((void *)&omp_get_max_threads, &info) && info.dli_fname)
        return info.dli_fname;
    return "unknown";
}
#elif defined(_OPENMP) && defined(_MSC_VER)
static inline const char *cbn_openmp_library(void) { return "vcomp (MSVC)"; }
#elif defined(_OPENMP)
static inline const char *cbn_openmp_library(void) { return "unknown"; }
#else
static inline const char *cbn_openmp_library(void) { return "none"; }
#endif

#endif /* CBN_OPENMP_H */
