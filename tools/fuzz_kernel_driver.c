/* Fuzz driver of the crop-decode kernel (dailymae_jax/data/_jpeg_crop.c, _jpeg_index.c): tools/fuzz_kernel.py
 * builds it with the kernel under AddressSanitizer and UndefinedBehaviorSanitizer and runs it over a corpus of
 * valid JPEGs.
 *
 *   fuzz_kernel_driver [--seed S] [--first K] [--count N] [--progress FILE] [--dump OUT] [--verbose 1] BASE.jpg...
 *   fuzz_kernel_driver --plant overread|overflow      (a deliberate bug: shows that a report fails the run)
 *
 * Case k (k = first .. first + count - 1) is a function of (seed, k) alone: it picks a base file, applies one to
 * three mutations (truncation, bit flips, byte values, marker and segment-length changes, crafted SOF, DHT, DRI,
 * SOS and crop-index fields, stray or missing restart markers, cut or repeated chunks, another file's scan) and
 * feeds the result, in a heap block of exactly its size, to the entry points the loader and the writer use:
 * dm_decode_crop with the whole image and with random boxes, a few far outside it (random output sizes and
 * flags: flip, area, index ignored, libjpeg's Huffman decoder, no splicing, no DCT scaling, ...), and
 * dm_index_add, whose output, if any, is decoded again. Each case also builds Huffman lookup tables from a random
 * table. Before case 0, every base file is decoded whole, and with a box at INT32_MAX - 1. Errors the kernel
 * returns are expected; only sanitizer reports (which abort the process) and crashes count. --progress keeps the
 * current case number in FILE (so that a hang or a crash can be replayed), --dump writes the mutated bytes of
 * case --first to OUT instead of decoding them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The index half of the kernel is compiled into this file, so that its Huffman table builder (static) is fuzzed
 * directly too, with tables libjpeg would refuse before it ever gets them; _jpeg_crop.c is linked beside. */
#include "_jpeg_index.c"

int dm_decode_crop(const uint8_t *src, uint64_t size, int32_t top, int32_t left, int32_t h, int32_t w, uint8_t *dst,
                   int32_t out_h, int32_t out_w, int32_t flags, int32_t *info);

#define MAX_BASES 256
#define FLAG_BITS 10 /* the kernel's flags 1 .. 512, DM_DECODE_ONLY (64) among them */
#define INFO_LEN 6

typedef struct {
    uint8_t *data;
    size_t size, cap;
} bytes;

typedef struct {
    bytes file;
    int height, width;
} base;

static base bases[MAX_BASES];
static int nbases;
static FILE *progress;
static int verbose; /* --verbose 1: every call on stderr */

/* What is being decoded now, in the --progress file (read back when the process dies or hangs). */
static void note_progress(const char *what, unsigned long long k) {
    if (!progress) return;
    rewind(progress);
    if (what) fprintf(progress, "base %s\n", what);
    else fprintf(progress, "%llu\n", k);
    fflush(progress);
    if (ftruncate(fileno(progress), ftell(progress))) return;
}

/* splitmix64: every case's random stream from (seed, case) */
static uint64_t rng_state;

static uint64_t next_random(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static size_t below(size_t n) { return n ? (size_t)(next_random() % n) : 0; }

static int chance(int percent) { return (int)below(100) < percent; }

static void grow(bytes *b, size_t size) {
    if (b->cap >= size) return;
    b->cap = size + size / 2 + 64;
    b->data = (uint8_t *)realloc(b->data, b->cap);
    if (!b->data) {
        fprintf(stderr, "fuzz driver: out of memory\n");
        exit(2);
    }
}

static void insert(bytes *b, size_t at, const uint8_t *src, size_t n) {
    grow(b, b->size + n);
    memmove(b->data + at + n, b->data + at, b->size - at);
    memcpy(b->data + at, src, n);
    b->size += n;
}

static void erase(bytes *b, size_t at, size_t n) {
    memmove(b->data + at, b->data + at + n, b->size - at - n);
    b->size -= n;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Where things are in a (possibly already mutated) file                                                    */

typedef struct {
    size_t marker_at; /* the 0xFF of the marker */
    size_t payload, length;
    int marker;
} segment;

/* The header's segments from SOI up to and including the first SOS (fewer where it is malformed). */
static int header_segments(const bytes *b, segment *out, int max) {
    size_t pos = 2, payload, length;
    int marker, n = 0;
    if (b->size < 4 || b->data[0] != 0xFF || b->data[1] != 0xD8) return 0;
    while (n < max) {
        size_t at = pos;
        if (!dm_next_segment(b->data, b->size, &pos, &marker, &payload, &length)) break;
        out[n++] = (segment){at, payload, length, marker};
        if (marker == 0xDA) break;
    }
    return n;
}

static const segment *find_marker(const segment *s, int n, int lo, int hi) {
    const segment *found[64];
    int k = 0;
    for (int i = 0; i < n && k < 64; i++)
        if (s[i].marker >= lo && s[i].marker <= hi) found[k++] = &s[i];
    return k ? found[below((size_t)k)] : NULL;
}

static size_t scan_start(const segment *s, int n) {
    return n && s[n - 1].marker == 0xDA ? s[n - 1].payload + s[n - 1].length : 0;
}

static void put16(uint8_t *p, unsigned v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static unsigned interesting16(void) {
    static const unsigned values[] = {0, 1, 2, 7, 8, 9, 15, 16, 17, 255, 256, 4096, 12000, 32767, 32768, 65500, 65535};
    return chance(75) ? values[below(sizeof values / sizeof values[0])] : (unsigned)below(65536);
}

static uint8_t interesting8(void) {
    static const uint8_t values[] = {0x00, 0x01, 0x02, 0x0F, 0x10, 0x11, 0x22, 0x44, 0x7F, 0x80, 0xFE, 0xFF};
    return chance(60) ? values[below(sizeof values)] : (uint8_t)below(256);
}

/* ------------------------------------------------------------------------------------------------------ */
/* Mutations: each changes b in place and returns 0 where it found nothing to change                        */

static int truncate_file(bytes *b, const segment *s, int n) {
    size_t start = scan_start(s, n);
    if (chance(30) && n) { /* right after a header segment's marker, length or payload */
        const segment *g = &s[below((size_t)n)];
        size_t cuts[] = {g->marker_at + 2, g->payload, g->payload + 1, g->payload + g->length};
        size_t cut = cuts[below(4)];
        if (cut < b->size) b->size = cut;
    } else if (chance(40) && start && start < b->size) {
        b->size = start + below(b->size - start);
    } else {
        b->size = below(b->size);
    }
    return 1;
}

static int flip_bits(bytes *b, const segment *s, int n) {
    size_t start = scan_start(s, n), flips = 1 + below(8);
    for (size_t i = 0; i < flips; i++) {
        size_t at = chance(40) && start ? below(start) : below(b->size);
        b->data[at] ^= (uint8_t)(1u << below(8));
    }
    return 1;
}

static int set_bytes(bytes *b, const segment *s, int n) {
    size_t start = scan_start(s, n), count = 1 + below(4);
    for (size_t i = 0; i < count; i++) b->data[chance(40) && start ? below(start) : below(b->size)] = interesting8();
    return 1;
}

static int change_marker(bytes *b, const segment *s, int n) {
    static const uint8_t markers[] = {0x01, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC9, 0xCC, 0xD0, 0xD3, 0xD7,
                                      0xD8, 0xD9, 0xDA, 0xDB, 0xDD, 0xE0, 0xE9, 0xFE, 0xFF};
    size_t at;
    if (n && chance(70)) {
        at = s[below((size_t)n)].marker_at;
    } else { /* any 0xFF xx in the file, restart markers and EOI included */
        size_t from = below(b->size);
        const uint8_t *p = (const uint8_t *)memchr(b->data + from, 0xFF, b->size - from);
        if (!p || p + 1 >= b->data + b->size) return 0;
        at = (size_t)(p - b->data);
    }
    if (at + 1 >= b->size) return 0;
    b->data[at + 1] = markers[below(sizeof markers)];
    return 1;
}

static int change_length(bytes *b, const segment *s, int n) {
    if (!n) return 0;
    const segment *g = &s[below((size_t)n)];
    unsigned len = (unsigned)g->length + 2;
    unsigned values[] = {0, 1, 2, 3, len - 1, len + 1, len + 2, (unsigned)below(65536), 0xFFFF};
    put16(b->data + g->payload - 2, values[below(sizeof values / sizeof values[0])] & 0xFFFF);
    return 1;
}

/* Frame header: dimensions (huge ones with little data among them), component count, sampling, precision. */
static int craft_sof(bytes *b, const segment *s, int n) {
    const segment *g = find_marker(s, n, 0xC0, 0xC3);
    if (!g || g->length < 6) return 0;
    uint8_t *p = b->data + g->payload;
    switch (below(5)) {
        case 0: put16(p + 1, interesting16()); break;
        case 1: put16(p + 3, interesting16()); break;
        case 2: put16(p + 1, chance(50) ? 12000 : 65500); put16(p + 3, chance(50) ? 12000 : 65500); break;
        case 3: p[chance(50) ? 0 : 5] = interesting8(); break;
        default: {
            size_t comps = (g->length - 6) / 3;
            if (!comps) return 0;
            p[6 + 3 * below(comps) + below(3)] = interesting8(); /* id, sampling factors or quant table */
        }
    }
    return 1;
}

/* Huffman table: class and id, code counts (over-subscribed, too many symbols), symbol values. */
static int craft_dht(bytes *b, const segment *s, int n) {
    const segment *g = find_marker(s, n, 0xC4, 0xC4);
    if (!g || g->length < 17) return 0;
    uint8_t *p = b->data + g->payload;
    size_t symbols = 0;
    for (int i = 1; i <= 16; i++) symbols += p[i];
    switch (below(4)) {
        case 0: p[0] = interesting8(); break;
        case 1: p[1 + below(16)] = interesting8(); break;
        case 2: p[1 + below(16)] += (uint8_t)(1 + below(3)); break;
        default:
            if (17 + symbols > g->length || !symbols) return 0;
            p[17 + below(symbols)] = interesting8();
    }
    return 1;
}

/* Restart interval: change the one there is, or add one to a file whose scan has no restart markers. */
static int craft_dri(bytes *b, const segment *s, int n) {
    const segment *g = find_marker(s, n, 0xDD, 0xDD);
    if (g && g->length >= 2) {
        put16(b->data + g->payload, interesting16());
        return 1;
    }
    if (!n || s[n - 1].marker != 0xDA) return 0;
    uint8_t dri[6] = {0xFF, 0xDD, 0x00, 0x04, 0, 0};
    put16(dri + 4, chance(50) ? 1 + (unsigned)below(8) : interesting16());
    insert(b, s[n - 1].marker_at, dri, sizeof dri);
    return 1;
}

/* Scan header: component count and selectors, table numbers, spectral selection, approximation; or a scan
 * header cut to its length field at the end of the file. */
static int craft_sos(bytes *b, const segment *s, int n) {
    if (!n || s[n - 1].marker != 0xDA) return 0;
    const segment *g = &s[n - 1];
    uint8_t *p = b->data + g->payload;
    if (chance(15)) { /* SOS whose length says 2 (no payload), as the last bytes of the file */
        put16(p - 2, 2);
        b->size = g->payload;
        return 1;
    }
    if (!g->length) return 0;
    p[below(g->length)] = chance(30) ? (uint8_t)below(5) : interesting8();
    return 1;
}

/* Crop index: entries' bit positions and DC predictors (the header left alone, so that the index is used), or
 * one of its header fields. */
static int craft_index(bytes *b, const segment *s, int n) {
    const segment *g = NULL;
    for (int i = 0; i < n; i++)
        if (s[i].marker == 0xE9 && s[i].length >= 20 && memcmp(b->data + s[i].payload, "DMJXIDX1", 8) == 0) g = &s[i];
    if (!g) return 0;
    uint8_t *p = b->data + g->payload;
    const size_t entry_bytes = p[15] ? p[15] : 1, entries = (g->length - 20) / entry_bytes;
    if (chance(15) || !entries) {
        p[8 + below(12)] = interesting8();
        return 1;
    }
    uint8_t *e = p + 20 + below(entries) * entry_bytes;
    uint32_t scan = (uint32_t)p[16] | (uint32_t)p[17] << 8 | (uint32_t)p[18] << 16 | (uint32_t)p[19] << 24;
    uint32_t at;
    switch (below(4)) {
        case 0: at = (uint32_t)below(scan + 4) | (uint32_t)below(8) << 29; break; /* anywhere, just past the end */
        case 1: at = (uint32_t)next_random(); break;
        case 2: at = (uint32_t)(e[0] | e[1] << 8 | e[2] << 16 | (uint32_t)e[3] << 24) + (uint32_t)below(5) - 2; break;
        default: e[4 + below(entry_bytes > 4 ? entry_bytes - 4 : 1)] = interesting8(); return 1;
    }
    for (int i = 0; i < 4; i++) e[i] = (uint8_t)(at >> (8 * i));
    return 1;
}

/* Entropy-coded data: a stray marker (restart, EOI, other), a restart marker renumbered or removed. */
static int craft_scan(bytes *b, const segment *s, int n) {
    size_t start = scan_start(s, n);
    if (!start || start + 2 >= b->size) return 0;
    size_t at = start + below(b->size - start - 1);
    if (chance(50)) {
        static const uint8_t markers[] = {0xD0, 0xD1, 0xD7, 0xD9, 0xC4, 0xDA, 0xFF, 0x00};
        uint8_t m[2] = {0xFF, markers[below(sizeof markers)]};
        if (chance(50)) insert(b, at, m, 2); else memcpy(b->data + at, m, 2);
        return 1;
    }
    const uint8_t *p = b->data + at;
    while ((p = (const uint8_t *)memchr(p, 0xFF, (size_t)(b->data + b->size - p))) && p + 1 < b->data + b->size &&
           !(p[1] >= 0xD0 && p[1] <= 0xD7))
        p++;
    if (!p || p + 1 >= b->data + b->size) return 0;
    if (chance(50)) erase(b, (size_t)(p - b->data), 2); else b->data[p - b->data + 1] = (uint8_t)(0xD0 + below(8));
    return 1;
}

/* A chunk cut out or repeated. */
static int cut_or_repeat(bytes *b, const segment *s, int n) {
    (void)s, (void)n;
    size_t at = below(b->size), len = 1 + below(chance(70) ? 16 : 512);
    if (at + len > b->size) len = b->size - at;
    if (!len) return 0;
    if (chance(50)) {
        erase(b, at, len);
    } else {
        uint8_t *copy = (uint8_t *)malloc(len);
        memcpy(copy, b->data + at, len);
        insert(b, below(b->size + 1), copy, len);
        free(copy);
    }
    return 1;
}

/* Another base file's entropy-coded data behind this file's header (other size, tables, sampling). */
static int foreign_scan(bytes *b, const segment *s, int n) {
    size_t start = scan_start(s, n);
    const base *other = &bases[below((size_t)nbases)];
    segment t[64];
    size_t other_start = scan_start(t, header_segments(&other->file, t, 64));
    if (!start || !other_start) return 0;
    b->size = start;
    insert(b, start, other->file.data + other_start, other->file.size - other_start);
    return 1;
}

typedef int (*mutation)(bytes *, const segment *, int);
static const mutation mutations[] = {truncate_file, flip_bits, set_bytes, change_marker, change_length, craft_sof,
                                     craft_dht, craft_dri, craft_sos, craft_index, craft_scan, cut_or_repeat,
                                     foreign_scan};
#define NUM_MUTATIONS (sizeof mutations / sizeof mutations[0])

/* ------------------------------------------------------------------------------------------------------ */
/* Cases                                                                                                     */

/* The frame size the (mutated) header declares, or the base's where it declares none. */
static void declared_size(const bytes *b, const base *from, int *height, int *width) {
    segment s[64];
    int n = header_segments(b, s, 64);
    *height = from->height;
    *width = from->width;
    for (int i = 0; i < n; i++) {
        if (s[i].marker >= 0xC0 && s[i].marker <= 0xC3 && s[i].length >= 5) {
            const uint8_t *p = b->data + s[i].payload;
            if ((p[1] << 8 | p[2]) && (p[3] << 8 | p[4])) {
                *height = p[1] << 8 | p[2];
                *width = p[3] << 8 | p[4];
            }
        }
    }
}

static void decode(const uint8_t *data, size_t size, int height, int width, int whole) {
    int h = whole ? height : 1 + (int)below((size_t)height), w = whole ? width : 1 + (int)below((size_t)width);
    int top = (int)below((size_t)(height - h + 1)), left = (int)below((size_t)(width - w + 1));
    if (chance(10)) top += (int)below(3) - 1; /* a box one pixel outside, now and then */
    if (chance(3)) { /* far outside, as a caller's arithmetic gone wrong would give: near INT32_MAX, or negative */
        int32_t wild = chance(50) ? INT32_MAX - (int32_t)below(100000) : -1 - (int32_t)below(100);
        if (chance(50)) top = wild; else left = wild;
    }
    int out_h = chance(10) ? 224 : 1 + (int)below(chance(50) ? 8 : 96);
    int out_w = chance(30) ? out_h : 1 + (int)below(96);
    int flags = 0;
    for (int bit = 0; bit < FLAG_BITS; bit++)
        if (chance(bit == 0 || bit == 1 ? 50 : 12)) flags |= 1 << bit;
    uint8_t *dst = (uint8_t *)malloc((size_t)out_h * out_w * 3);
    int32_t *info = chance(50) ? (int32_t *)malloc(INFO_LEN * sizeof(int32_t)) : NULL;
    if (verbose)
        fprintf(stderr, "dm_decode_crop(%zu bytes, top=%d, left=%d, h=%d, w=%d, out %dx%d, flags=%d)\n", size, top,
                left, h, w, out_h, out_w, flags);
    dm_decode_crop(data, size, top, left, h, w, dst, out_h, out_w, flags, info);
    free(info);
    free(dst);
}

/* Lookup tables from a random Huffman table (code counts over-subscribed or too many symbols now and then):
 * build_table must refuse what does not fit without writing outside its tables. */
static void build_random_table(void) {
    static huff_table table;
    JHUFF_TBL h;
    memset(&h, 0, sizeof h);
    int symbols = 0, length_max = 1 + (int)below(16);
    for (int l = 1; l <= length_max && symbols < 256; l++) {
        h.bits[l] = (UINT8)(chance(20) ? interesting8() : below((size_t)(1 << (l < 4 ? l : 4)) + 1));
        symbols += h.bits[l];
    }
    for (int i = 0; i < 256; i++) h.huffval[i] = (UINT8)(chance(50) ? below(16) : below(256));
    build_table(&table, &h, (int)below(2));
}

/* One case: mutate a copy of a base file, then run it through the kernel's entry points. */
static void run_case(uint64_t seed, uint64_t k, const char *dump) {
    rng_state = seed * 0x100000001B3ull ^ k * 0x9E3779B97F4A7C15ull;
    next_random();
    build_random_table();
    const base *from = &bases[below((size_t)nbases)];
    bytes b = {0};
    grow(&b, from->file.size);
    memcpy(b.data, from->file.data, from->file.size);
    b.size = from->file.size;
    for (int m = 0, todo = 1 + (int)below(3); m < todo && b.size; m++) {
        segment s[64];
        int n = header_segments(&b, s, 64);
        for (int tries = 0; tries < 8 && !mutations[below(NUM_MUTATIONS)](&b, s, n); tries++) {
        }
    }
    if (dump) {
        FILE *f = fopen(dump, "wb");
        if (!f || fwrite(b.data, 1, b.size, f) != b.size || fclose(f)) {
            fprintf(stderr, "fuzz driver: cannot write %s\n", dump);
            exit(2);
        }
        free(b.data);
        return;
    }
    uint8_t *exact = (uint8_t *)malloc(b.size ? b.size : 1); /* exactly its size: a read past it is reported */
    memcpy(exact, b.data, b.size);
    free(b.data);
    int height, width;
    declared_size(&(bytes){exact, b.size, b.size}, from, &height, &width);
    if (height > 4096 && chance(50)) height = from->height; /* boxes inside the real data too */
    if (width > 4096 && chance(50)) width = from->width;
    decode(exact, b.size, height, width, 1);
    for (int i = 0, boxes = 1 + (int)below(3); i < boxes; i++) decode(exact, b.size, height, width, 0);
    if (chance(40)) { /* the writer's entry point, and a decode of what it made */
        uint64_t cap = b.size + 65540;
        uint8_t *indexed = (uint8_t *)malloc(cap);
        char message[200];
        int64_t made = dm_index_add(exact, b.size, 1 + (int32_t)below(chance(50) ? 16 : 200), indexed, cap, message,
                                    (int32_t)sizeof message);
        if (made > 0) decode(indexed, (size_t)made, height, width, 0);
        free(indexed);
    }
    free(exact);
}

/* ------------------------------------------------------------------------------------------------------ */

static int read_base(const char *path, base *out) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    bytes b = {0};
    uint8_t chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) insert(&b, b.size, chunk, got);
    fclose(f);
    out->file = b;
    out->height = out->width = 0;
    declared_size(&b, out, &out->height, &out->width);
    return out->height > 0 && out->width > 0;
}

/* A deliberate bug of each kind the sanitizers catch, to show that a report fails the run. */
static int plant(const char *kind) {
    volatile int big = 0x7FFFFFFF;  /* INT_MAX, and a size, unknown to the compiler */
    volatile size_t size = 16;
    uint8_t *p = (uint8_t *)calloc(size, 1);
    int result = strcmp(kind, "overread") == 0 ? p[size] : big + 1;
    free(p);
    return result;
}

int main(int argc, char **argv) {
    uint64_t seed = 0, first = 0, count = 1000;
    const char *dump = NULL;
    int i = 1;
    for (; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (strcmp(argv[i], "--seed") == 0) seed = strtoull(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--first") == 0) first = strtoull(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--count") == 0) count = strtoull(argv[i + 1], NULL, 10);
        else if (strcmp(argv[i], "--progress") == 0) progress = fopen(argv[i + 1], "w");
        else if (strcmp(argv[i], "--dump") == 0) dump = argv[i + 1];
        else if (strcmp(argv[i], "--verbose") == 0) verbose = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--plant") == 0) return plant(argv[i + 1]);
        else break;
    }
    for (; i < argc; i++) {
        if (nbases == MAX_BASES || !read_base(argv[i], &bases[nbases++])) {
            fprintf(stderr, "fuzz driver: %s is not a readable JPEG with a frame header (or too many files)\n",
                    argv[i]);
            return 2;
        }
    }
    if (!nbases) {
        fprintf(stderr, "usage: fuzz_kernel_driver [--seed S] [--first K] [--count N] [--progress FILE] "
                        "[--dump OUT] [--verbose 1] BASE.jpg...\n");
        return 2;
    }
    if (dump) {
        run_case(seed, first, dump);
        return 0;
    }
    for (int b = 0; b < nbases && first == 0; b++) { /* the base files themselves first: whole, and far outside */
        note_progress(argv[argc - nbases + b], 0);
        const base *f = &bases[b];
        uint8_t *exact = (uint8_t *)malloc(f->file.size), *dst = (uint8_t *)malloc(3 * 32 * 32);
        memcpy(exact, f->file.data, f->file.size);
        for (int flags = 0; flags <= 128; flags += 128) /* our Huffman decoder, then libjpeg's */
            dm_decode_crop(exact, f->file.size, 0, 0, f->height, f->width, dst, 32, 32, flags, NULL);
        dm_decode_crop(exact, f->file.size, INT32_MAX - 1, 0, f->height, f->width, dst, 32, 32, 0, NULL);
        dm_decode_crop(exact, f->file.size, 0, INT32_MAX - 1, f->height, f->width, dst, 32, 32, 0, NULL);
        free(dst);
        free(exact);
    }
    for (uint64_t k = first; k < first + count; k++) {
        note_progress(NULL, (unsigned long long)k);
        run_case(seed, k, NULL);
    }
    for (int b = 0; b < nbases; b++) free(bases[b].file.data);
    printf("%llu\n", (unsigned long long)count);
    return 0;
}
