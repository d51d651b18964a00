/* The quantized product checked on a target this machine cannot load into Python (NEON under qemu, see
 * tests/test_other_architectures.py): it reads cases written on the host (the packed weights, x and the
 * host's result), multiplies, and requires the same bits, the product being defined to give the same
 * result on every CPU class. A case file: int64 M, K, N, kind, block, scale_bytes, data bytes; then the
 * packed data, x [M, K] and y [M, N] float32. Exit status 0 when every case matches. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "linear.h"

static int check(const char *path) {
    FILE *f = fopen(path, "rb");
    int64_t h[7];
    if (f == NULL || fread(h, sizeof h, 1, f) != 1) return 1;
    const int64_t M = h[0], K = h[1], N = h[2];
    uint8_t *data = malloc((size_t)h[6]);
    float *x = malloc(sizeof(float) * M * K), *expected = malloc(sizeof(float) * M * N), *y = malloc(sizeof(float) * M * N);
    if (fread(data, 1, (size_t)h[6], f) != (size_t)h[6] || fread(x, sizeof(float), M * K, f) != (size_t)(M * K) ||
        fread(expected, sizeof(float), M * N, f) != (size_t)(M * N))
        return 1;
    fclose(f);
    LinearWeights w;
    memset(&w, 0, sizeof w);
    w.segments = 1;
    w.segment[0] = (QuantSegment){data, h[3], h[4], h[5], N};
    linear_product(x, M, K, K, &w, N, NULL, NULL, y);
    const int same = memcmp(y, expected, sizeof(float) * M * N) == 0;
    if (!same) printf("%s: differs from the host's result\n", path);
    return !same;
}

int main(int argc, char **argv) {
    int bad = 0;
    for (int i = 1; i < argc; ++i) bad |= check(argv[i]);
    if (!bad) printf("ok\n");
    return bad;
}
