/* Non-temporal stores for outputs that do not fit in cache.
 *
 * A plain store first reads the line it writes into cache (read for
 * ownership), so writing an array that will not be read back soon costs a
 * read and a write of memory; a non-temporal store writes the line to memory
 * directly.  cbn's elementwise loops compute a chunk of a contiguous output
 * run into a buffer in L1, then cbn_stream_copy moves it out: the whole
 * 64-byte lines of the destination with non-temporal stores, the partial
 * lines at the ends of the run with plain ones (other threads may write the
 * rest of those lines).  Only on x86-64 with GCC or Clang; elsewhere
 * cbn_stream_copy is memcpy.  The values stored are the same bits either way.
 */
#ifndef CBN_STREAM_H
#define CBN_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* bytes in a cache line, the unit of a non-temporal store */
#define CBN_LINE 64
/* bytes of the L1 buffer an output chunk goes through */
#define CBN_STREAM_BYTES 4096
/* shorter runs are stored directly (their partial lines would be most of them) */
#define CBN_STREAM_MIN_RUN 512

/* Bytes from address (or byte offset) a to the next line boundary, 0 on one */
static inline size_t cbn_line_gap(uintptr_t a) { return (size_t)(-a) & (CBN_LINE - 1); }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CBN_NO_STREAM)
#include <immintrin.h>
#define CBN_HAVE_STREAM 1

__attribute__((target("avx512f"))) static void cbn_stream_lines_avx512(char *d, const char *s, size_t lines)
{
    for (size_t k = 0; k < lines; k++, d += 64, s += 64)
        _mm512_stream_si512((void *)d, _mm512_loadu_si512((const void *)s));
}

__attribute__((target("avx"))) static void cbn_stream_lines_avx(char *d, const char *s, size_t lines)
{
    for (size_t k = 0; k < lines; k++, d += 64, s += 64) {
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
        _mm256_stream_si256((__m256i *)(d + 32), _mm256_loadu_si256((const __m256i *)(s + 32)));
    }
}

static void cbn_stream_lines_sse2(char *d, const char *s, size_t lines)
{
    for (size_t k = 0; k < lines; k++, d += 64, s += 64)
        for (int j = 0; j < 64; j += 16)
            _mm_stream_si128((__m128i *)(d + j), _mm_loadu_si128((const __m128i *)(s + j)));
}

/* Make this thread's non-temporal stores visible before others read them. */
static inline void cbn_stream_fence(void) { _mm_sfence(); }
#else
#define CBN_HAVE_STREAM 0
static inline void cbn_stream_fence(void) {}
#endif

/* dst[0:n] = src[0:n] (bytes), dst's whole 64-byte lines by non-temporal stores */
static inline void cbn_stream_copy(void *dst, const void *src, size_t n)
{
#if CBN_HAVE_STREAM
    char *d = (char *)dst;
    const char *s = (const char *)src;
    size_t head = cbn_line_gap((uintptr_t)d);
    if (head > n)
        head = n;
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    size_t lines = n / CBN_LINE;
    if (__builtin_cpu_supports("avx512f"))
        cbn_stream_lines_avx512(d, s, lines);
    else if (__builtin_cpu_supports("avx"))
        cbn_stream_lines_avx(d, s, lines);
    else
        cbn_stream_lines_sse2(d, s, lines);
    d += CBN_LINE * lines, s += CBN_LINE * lines, n -= CBN_LINE * lines;
    memcpy(d, s, n);
#else
    memcpy(dst, src, n);
#endif
}

/* p rounded up to a line boundary (for a buffer of CBN_LINE - 1 bytes more than it needs) */
static inline void *cbn_line_up(void *p) { return (char *)p + cbn_line_gap((uintptr_t)p); }

/* Values of size t from index `start` to the next line boundary, when index 0 is on one */
static inline ptrdiff_t cbn_line_rest(ptrdiff_t start, size_t t)
{
    return (ptrdiff_t)(cbn_line_gap((uintptr_t)start * t) / t);
}

/* Values of type size t in the chunk of a run that starts at p: up to `bytes` (at most the buffer's
 * size), ending on a line boundary of the destination (so that only the run's first and last lines
 * are partial). */
static inline ptrdiff_t cbn_stream_chunk(const void *p, ptrdiff_t left, size_t t, size_t bytes)
{
    ptrdiff_t k = (ptrdiff_t)((bytes - ((uintptr_t)p & (CBN_LINE - 1))) / t);
    return k < left ? k : left;
}

#endif /* CBN_STREAM_H */
