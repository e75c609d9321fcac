/*
 * The processor's fp32 arithmetic peak, measured: each thread runs independent chains of fused
 * multiply-adds on the widest vectors the compiler was told about (-march=native), enough chains
 * to hide the FMA latency on every FMA unit. Prints GFLOP/s over all threads as JSON.
 *   cc -O3 -march=native fma-peak.c -o fma-peak -lpthread && ./fma-peak 2
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#define STORE _mm512_storeu_ps
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#define STORE _mm256_storeu_ps
#endif

#define CHAINS 12
#define ITERATIONS 100000000L

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *chains(void *out) {
  vec acc[CHAINS];
  const vec m = SET1(0.999999f), c = SET1(1e-7f);
  for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
  for (long k = 0; k < ITERATIONS; k++)
    for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], m, c);
  vec sum = acc[0];
  for (int i = 1; i < CHAINS; i++) sum = ADD(sum, acc[i]);
  /* Stored so the compiler cannot drop the loop. */
  STORE((float *)out, sum);
  return NULL;
}

int main(int argc, char **argv) {
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > 256) threads = 1;
  pthread_t *ids = malloc(sizeof(pthread_t) * threads);
  float *sink = malloc(sizeof(float) * LANES * threads);
  double best = 0;
  for (int run = 0; run < 3; run++) {
    double start = now();
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, chains, sink + t * LANES);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    double rate = 2.0 * LANES * CHAINS * ITERATIONS * threads / (now() - start) / 1e9;
    if (rate > best) best = rate;
  }
  printf("{\"gflops\": %.1f, \"threads\": %d, \"lanes\": %d, \"check\": %g}\n", best, threads, LANES,
         (double)sink[0]);
  return 0;
}
