/* The CPU's arithmetic peak per precision: independent chains of one instruction on every core.
 *   fp32: vfmadd231ps (2 FLOPs a lane), bf16: vdpbf16ps (2 bf16 products + adds a fp32 lane = 4 FLOPs),
 *   int8: vpdpbusd (4 u8*s8 products + adds a int32 lane = 8 OPs).
 * On a CPU without AVX-512, fp32 is measured with AVX2 FMA (8 lanes) instead.
 * Built and run by bench/ceiling.py; prints "name GOPS" lines. Each kind is only run when the CPU has it. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHAINS 16
#define ITERS 200000000L

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

__attribute__((target("avx512f"))) static void *fp32(void *out) {
  __m512 acc[CHAINS], a = _mm512_set1_ps(1e-7f), b = _mm512_set1_ps(0.999f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < ITERS; n++)
    _Pragma("GCC unroll 16") for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, a);
  __m512 s = acc[0]; for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
  *(float *)out = _mm512_reduce_add_ps(s); return NULL;
}

__attribute__((target("avx512f,avx512bf16"))) static void *bf16(void *out) {
  __m512 acc[CHAINS]; __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
  for (long n = 0; n < ITERS; n++)
    _Pragma("GCC unroll 16") for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  __m512 s = acc[0]; for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
  *(float *)out = _mm512_reduce_add_ps(s); return NULL;
}

__attribute__((target("avx512f,avx512vnni"))) static void *int8(void *out) {
  __m512i acc[CHAINS], a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(1);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
  for (long n = 0; n < ITERS; n++)
    _Pragma("GCC unroll 16") for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  __m512i s = acc[0]; for (int i = 1; i < CHAINS; i++) s = _mm512_add_epi32(s, acc[i]);
  *(float *)out = (float)_mm512_reduce_add_epi32(s); return NULL;
}

/* AVX2 CPUs (no AVX-512): 8-lane FMA chains; reported as fp32 with 8 lanes (see run's `lanes`). */
__attribute__((target("avx2,fma"))) static void *fp32_avx2(void *out) {
  __m256 acc[CHAINS], a = _mm256_set1_ps(1e-7f), b = _mm256_set1_ps(0.999f);
  for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < ITERS; n++)
    _Pragma("GCC unroll 16") for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], b, a);
  __m256 s = acc[0]; for (int i = 1; i < CHAINS; i++) s = _mm256_add_ps(s, acc[i]);
  float lanes[8]; _mm256_storeu_ps(lanes, s);
  *(float *)out = lanes[0]; return NULL;
}

static void run_lanes(const char *name, void *(*fn)(void *), double ops_per_lane, int threads, int lanes) {
  pthread_t t[64]; float sink[64];
  double start = now();
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, fn, &sink[i]);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  double secs = now() - start;
  double ops = (double)threads * ITERS * CHAINS * lanes * ops_per_lane;
  printf("%s %.1f\n", name, ops / secs / 1e9);
  fprintf(stderr, "%s: %.3f s (sink %g)\n", name, secs, sink[0]);
}

static void run(const char *name, void *(*fn)(void *), double ops_per_lane, int threads) {
  run_lanes(name, fn, ops_per_lane, threads, 16);
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) run("fp32", fp32, 2, threads);
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) run_lanes("fp32", fp32_avx2, 2, threads, 8);
  if (__builtin_cpu_supports("avx512bf16")) run("bf16", bf16, 4, threads);
  if (__builtin_cpu_supports("avx512vnni")) run("int8", int8, 8, threads);
  return 0;
}
