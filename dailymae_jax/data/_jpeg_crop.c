/* Crop decoding of JPEG images with DCT-domain downscaling, and the resampler that finishes the job.
 *
 * dm_decode_crop() turns (JPEG bytes, crop box, output size) into output pixels:
 *   1. Pick the DCT scale 1/d, d in {1, 2, 4, 8}: the largest d for which the crop, shrunk by d, still has at
 *      least the output's size in both dimensions (libjpeg then runs a reduced IDCT: less work, and the
 *      downscale it does is a proper low-pass one).
 *   2. Decode only the crop region. When the file has restart markers whose intervals tile the MCU grid, the
 *      entropy-coded segments covering the crop are copied into a smaller, standard JPEG (same tables, new
 *      frame size, restart markers renumbered), so no MCU outside the crop's MCU-aligned box is ever
 *      entropy-decoded. Otherwise libjpeg decodes the crop's MCU columns (jpeg_crop_scanline), skips the
 *      rows above it (jpeg_skip_scanlines) and stops after its last row; Huffman decoding of the skipped
 *      MCUs of those rows cannot be avoided by libjpeg; with a crop index in the file (_jpeg_index.c), our own
 *      Huffman decoder skips them, and the MCUs beside the crop too.
 *   3. Resample the exact (fractional, after scaling) box to the output size with a separable filter:
 *      bicubic (a = -0.5, widened by the scale factor when shrinking, i.e. antialiased as PIL does) or area
 *      averaging; an optional horizontal flip is folded into the horizontal pass. Rows go from libjpeg to the
 *      vertical filter as they are decoded: the crop never exists as a whole image. Where chroma is subsampled
 *      at the chosen DCT scale (4:2:0 at 1/1), the rows are planar YCbCr straight from libjpeg's component
 *      buffers: chroma is resampled from its own samples (no interpolated upsampling first), and only the
 *      output pixels are converted to RGB.
 *
 * Everything a call needs lives in per-thread state (a reusable libjpeg decompressor and scratch buffers of a
 * few rows of the crop), so the functions are re-entrant and can run from numba's prange threads without
 * per-sample buffers. libjpeg errors, and the warnings that mean corrupt pixel data, return DM_ERR_JPEG
 * with the message kept per thread (dm_error_message) instead of ending the process.
 *
 * The functions are called through ctypes (from Python and from numba-compiled loader code); the Python
 * module stub below only exists so that the file is built and found as a regular extension module.
 */
#ifndef DM_NO_PYTHON
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif

#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>
#include <jpegint.h> /* struct jpeg_color_deconverter: its color_convert is replaced for planar rows */

#include "_jpeg_index.h"

#define DM_OK 0
#define DM_ERR_JPEG (-1)   /* libjpeg rejected the data; see dm_error_message() */
#define DM_ERR_ARGS (-2)   /* box or output size invalid for this image */
#define DM_ERR_NOMEM (-3)

/* flags */
#define DM_FLIP 1                /* mirror the output horizontally */
#define DM_FILTER_AREA 2         /* area averaging instead of bicubic */
#define DM_NO_DCT_SCALING 4      /* always decode at full scale (for tests and benchmarks) */
#define DM_NO_SPLICE 8           /* never splice restart intervals (for tests and benchmarks) */
#define DM_FAST_UPSAMPLING 16    /* libjpeg's non-fancy chroma upsampling */
#define DM_FAST_IDCT 32          /* libjpeg's JDCT_IFAST */
#define DM_DECODE_ONLY 64        /* stop before resampling (profiling only: dst is left untouched) */
#define DM_LIBJPEG_HUFFMAN 128   /* libjpeg's own Huffman decoder instead of ours (tests, benchmarks) */
#define DM_NO_INDEX 256          /* ignore a crop index in the file (tests, benchmarks) */
#define DM_RGB_ROWS 512          /* resample libjpeg's RGB rows (fancy chroma upsampling) instead of the YCbCr
                                  * planes (tests, benchmarks) */

/* info[] slots filled by dm_decode_crop when info is not NULL */
#define DM_INFO_DENOM 0          /* DCT scale denominator used */
#define DM_INFO_SPLICED 1        /* 1 if restart intervals were spliced */
#define DM_INFO_ROWS 2           /* rows of the decoded region (at the DCT scale) */
#define DM_INFO_COLS 3           /* columns decoded (MCU-aligned, at the DCT scale) */
#define DM_INFO_INDEXED 4        /* 1 if a crop index let the Huffman decoder skip what the crop does not need */
#define DM_INFO_PLANAR 5         /* 1 if YCbCr planes were resampled (chroma at its own resolution), not RGB rows */
#define DM_INFO_LEN 6

#define DM_MAX_SIDE 65500
#define MSG_LEN 200

/* ------------------------------------------------------------------------------------------------------ */
/* Per-thread state                                                                                        */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *message;
} dm_error_mgr;

typedef struct {
    uint8_t *data;
    size_t size;
} dm_buffer;

/* Planar YCbCr rows: the region's luma samples, then its Cb and its Cr samples at their own (subsampled)
 * resolution, read straight from libjpeg's component rows, which our colour "converter" (take_planes) hands
 * over instead of converting them. */
typedef struct {
    int expand;                    /* pixels per chroma sample along a row: 2 for 4:2:0 at DCT scale 1/1 */
    int luma_first, luma_cols;     /* region columns in libjpeg's (cropped) output row */
    int chroma_first, chroma_cols; /* the chroma samples they need, in chroma samples */
    const uint8_t *rows[3];        /* the current row of each component (box-upsampled chroma) */
} dm_planes;

typedef struct {
    struct jpeg_decompress_struct cinfo; /* first member: take_planes finds its dm_thread from it */
    dm_error_mgr err;
    int cinfo_ready;
    char message[MSG_LEN];
    dm_buffer splice;      /* spliced JPEG */
    dm_buffer segments;    /* restart segment offsets */
    dm_buffer scanline;    /* one decoded row */
    dm_buffer kernels;     /* filter weights and tap positions */
    dm_buffer ring;        /* widened input rows (resampler) */
    dm_buffer columns;     /* vertical sums, 8 rows per vector (resampler) */
    dm_buffer outputs;     /* horizontal sums, 8 rows per vector (resampler) */
    dm_buffer bytes;       /* rounded outputs before the transpose into rows (resampler) */
    dm_entropy *entropy;   /* our Huffman decoder (_jpeg_index.c), allocated on first use */
    dm_planes planes;      /* the current decode's planar rows, if it uses them */
} dm_thread;

static pthread_key_t thread_key;
static pthread_once_t thread_key_once = PTHREAD_ONCE_INIT;

static void free_thread_state(void *state) {
    dm_thread *t = (dm_thread *)state;
    if (t->cinfo_ready) jpeg_destroy_decompress(&t->cinfo);
    dm_buffer *buffers[] = {&t->splice, &t->segments, &t->scanline, &t->kernels, &t->ring, &t->columns,
                            &t->outputs, &t->bytes};
    for (size_t i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]->data);
    dm_entropy_free(t->entropy);
    free(t);
}

static void make_thread_key(void) { pthread_key_create(&thread_key, free_thread_state); }

/* Grow a buffer to at least `size` bytes; contents are not kept. */
static void *reserve(dm_buffer *b, size_t size) {
    if (b->size < size) {
        size_t grown = size + size / 4 + 4096;
        void *p = malloc(grown);
        if (!p) return NULL;
        free(b->data);
        b->data = (uint8_t *)p;
        b->size = grown;
    }
    return b->data;
}

/* libjpeg error hooks: fatal errors and corrupt-data warnings jump back to the caller. */
static void on_error_exit(j_common_ptr cinfo) {
    dm_error_mgr *err = (dm_error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_emit_message(j_common_ptr cinfo, int level) {
    if (level >= 0) return;  /* trace messages */
    switch (cinfo->err->msg_code) {
        case JWRN_HIT_MARKER:
        case JWRN_HUFF_BAD_CODE:
        case JWRN_JPEG_EOF:
        case JWRN_MUST_RESYNC:
        case JWRN_ARITH_BAD_CODE:
        case JWRN_NOT_SEQUENTIAL:
            on_error_exit(cinfo);  /* the pixels would be wrong: fail instead of returning grey blocks */
            break;
        default:
            break;  /* e.g. extraneous bytes between markers, unknown JFIF revision: pixels are fine */
    }
}

static void on_output_message(j_common_ptr cinfo) { (void)cinfo; }

static dm_thread *thread_state(void) {
    pthread_once(&thread_key_once, make_thread_key);
    dm_thread *t = (dm_thread *)pthread_getspecific(thread_key);
    if (t) return t;
    t = (dm_thread *)calloc(1, sizeof(dm_thread));
    if (!t) return NULL;
    t->cinfo.err = jpeg_std_error(&t->err.pub);
    t->err.pub.error_exit = on_error_exit;
    t->err.pub.emit_message = on_emit_message;
    t->err.pub.output_message = on_output_message;
    t->err.message = t->message;
    if (setjmp(t->err.jump)) {
        free(t);
        return NULL;
    }
    jpeg_create_decompress(&t->cinfo);
    t->cinfo_ready = 1;
    pthread_setspecific(thread_key, t);
    return t;
}

/* ------------------------------------------------------------------------------------------------------ */
/* DCT scale                                                                                                */

/* Largest d in {1, 2, 4, 8} with crop_h >= d * out_h and crop_w >= d * out_w. */
int dm_dct_denominator(int32_t crop_h, int32_t crop_w, int32_t out_h, int32_t out_w) {
    int d = 1;
    while (d < 8 && (int64_t)crop_h >= (int64_t)2 * d * out_h && (int64_t)crop_w >= (int64_t)2 * d * out_w) d *= 2;
    return d;
}

/* Pixels of real context kept around a crop at DCT scale 1/d: libjpeg's chroma upsampling replicates the edge of
 * whatever it decodes, so the crop's own pixels must be at least one chroma sample (2d pixels at 2x
 * subsampling) away from the decoded region's edges to come out as in a full decode. */
static int context_margin(int d) { return 2 * d; }

/* ------------------------------------------------------------------------------------------------------ */
/* Restart-interval splicing                                                                                */

typedef struct {
    int width, height, ncomp;
    int mcu_w, mcu_h, mcus_x, mcus_y;
    unsigned restart;     /* MCUs per restart interval */
    size_t size_pos;      /* offset of the frame header's height field (width follows) */
    size_t scan_start;    /* first byte of entropy-coded data */
} dm_layout;

static int read16(const uint8_t *p) { return (p[0] << 8) | p[1]; }

/* Parse markers up to the first scan. Returns 1 if the file is a single-scan Huffman-coded sequential JPEG
 * with restart markers, i.e. one whose restart segments can be spliced; 0 otherwise (libjpeg then decodes
 * it, and reports anything malformed). */
static int parse_layout(const uint8_t *s, size_t n, dm_layout *L) {
    int have_frame = 0, hmax = 1, vmax = 1, marker;
    size_t pos = 2, at, len;
    memset(L, 0, sizeof(*L));
    if (n < 4 || s[0] != 0xFF || s[1] != 0xD8) return 0;
    for (;;) {
        if (!dm_next_segment(s, n, &pos, &marker, &at, &len)) return 0;
        const uint8_t *p = s + at;  /* the payload, len bytes */
        if (marker == 0xC0 || marker == 0xC1) {  /* baseline / extended sequential, Huffman */
            if (have_frame || len < 6) return 0;
            L->height = read16(p + 1);
            L->width = read16(p + 3);
            L->ncomp = p[5];
            if (L->ncomp < 1 || L->ncomp > 4 || len < (size_t)(6 + 3 * L->ncomp)) return 0;
            for (int c = 0; c < L->ncomp; c++) {
                int h = p[7 + 3 * c] >> 4, v = p[7 + 3 * c] & 15;
                if (h < 1 || h > 4 || v < 1 || v > 4) return 0;
                if (h > hmax) hmax = h;
                if (v > vmax) vmax = v;
            }
            L->size_pos = at + 1;
            have_frame = 1;
        } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
            return 0;  /* progressive, lossless or arithmetic-coded */
        } else if (marker == 0xDD) {
            if (len < 2) return 0;
            L->restart = (unsigned)read16(p);
        } else if (marker == 0xDA) {
            if (!have_frame || L->height == 0 || L->width == 0) return 0;
            if (len < 1 || p[0] != L->ncomp) return 0;  /* no component count, or a non-interleaved scan */
            L->scan_start = pos;
            break;
        }
    }
    if (L->restart == 0) return 0;
    if (L->ncomp == 1) {  /* a single-component scan is not interleaved: one block per MCU */
        L->mcu_w = L->mcu_h = 8;
    } else {
        L->mcu_w = 8 * hmax;
        L->mcu_h = 8 * vmax;
    }
    L->mcus_x = (L->width + L->mcu_w - 1) / L->mcu_w;
    L->mcus_y = (L->height + L->mcu_h - 1) / L->mcu_h;
    return 1;
}

/* Which restart segments cover the MCU box [r0, r1) x [c0, c1), and the pixel box of the spliced image. */
typedef struct {
    int seg_rows, seg_cols;      /* selected segments: seg_rows runs of seg_cols consecutive segments */
    long first_seg, row_step;    /* index of the first selected segment, index step between runs */
    int origin_x, origin_y;      /* top-left pixel of the spliced image in the original */
    int width, height;           /* size of the spliced image */
} dm_selection;

static int select_segments(const dm_layout *L, int r0, int r1, int c0, int c1, dm_selection *S) {
    long K = L->restart;
    if (L->mcus_x % K == 0) {  /* intervals tile each MCU row: select columns and rows */
        long per_row = L->mcus_x / K;
        long s0 = c0 / K, s1 = (c1 + K - 1) / K;
        S->seg_rows = r1 - r0;
        S->seg_cols = (int)(s1 - s0);
        S->first_seg = (long)r0 * per_row + s0;
        S->row_step = per_row;
        S->origin_x = (int)(s0 * K * L->mcu_w);
        S->origin_y = r0 * L->mcu_h;
        S->width = (s1 * K == L->mcus_x) ? L->width - S->origin_x : (int)((s1 - s0) * K * L->mcu_w);
        S->height = (r1 == L->mcus_y) ? L->height - S->origin_y : (r1 - r0) * L->mcu_h;
        return 1;
    }
    if (K % L->mcus_x == 0) {  /* intervals are whole MCU rows: select rows only */
        long rows = K / L->mcus_x;
        long s0 = r0 / rows, s1 = (r1 + rows - 1) / rows;
        S->seg_rows = 1;
        S->seg_cols = (int)(s1 - s0);
        S->first_seg = s0;
        S->row_step = 0;
        S->origin_x = 0;
        S->origin_y = (int)(s0 * rows * L->mcu_h);
        S->width = L->width;
        S->height = (s1 * rows >= L->mcus_y) ? L->height - S->origin_y : (int)((s1 - s0) * rows * L->mcu_h);
        return 1;
    }
    return 0;
}

/* Find the start and end of restart segments 0..needed-1 in the entropy-coded data. Returns the number
 * found (< needed when the scan ends early), or -1 if the restart markers are out of sequence. */
static long find_segments(const uint8_t *s, size_t n, size_t start, long needed, size_t *begin, size_t *end) {
    long count = 1;
    size_t p = start;
    begin[0] = start;
    while (count <= needed) {
        const uint8_t *q = (const uint8_t *)memchr(s + p, 0xFF, n - p);
        if (!q) break;
        p = (size_t)(q - s);
        if (p + 1 >= n) break;
        int b = s[p + 1];
        if (b == 0x00) {  /* stuffed zero: a data byte 0xFF */
            p += 2;
        } else if (b == 0xFF) {  /* fill byte before a marker */
            p += 1;
        } else if (b >= 0xD0 && b <= 0xD7) {
            if ((b & 7) != ((count - 1) & 7)) return -1;
            end[count - 1] = p;
            if (count == needed) return count;
            begin[count++] = p + 2;
            p += 2;
        } else {  /* EOI or another marker: the scan ends here */
            end[count - 1] = p;
            return count;
        }
    }
    end[count - 1] = n;
    return count;
}

static void write16(uint8_t *p, int v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Build the spliced JPEG for the MCU-aligned box around a crop widened by `margin` pixels on each side (see
 * context_margin). Returns its size, or 0 when splicing does not apply or would not help (libjpeg then decodes
 * the original). */
static size_t splice(dm_thread *t, const uint8_t *s, size_t n, int top, int left, int h, int w, int margin,
                     dm_selection *S) {
    dm_layout L;
    if (!parse_layout(s, n, &L)) return 0;
    if (top < 0 || left < 0 || (int64_t)top + h > L.height || (int64_t)left + w > L.width) return 0; /* no overflow */
    int r0 = (top > margin ? top - margin : 0) / L.mcu_h;
    int r1 = (top + h + margin + L.mcu_h - 1) / L.mcu_h;
    int c0 = (left > margin ? left - margin : 0) / L.mcu_w;
    int c1 = (left + w + margin + L.mcu_w - 1) / L.mcu_w;
    if (r1 > L.mcus_y) r1 = L.mcus_y;
    if (c1 > L.mcus_x) c1 = L.mcus_x;
    if (!select_segments(&L, r0, r1, c0, c1, S)) return 0;
    if (S->width == L.width && S->height == L.height) return 0;  /* the crop needs every MCU */
    long last = S->first_seg + (long)(S->seg_rows - 1) * S->row_step + S->seg_cols - 1;
    long needed = last + 1;
    size_t *begin = (size_t *)reserve(&t->segments, 2 * (size_t)needed * sizeof(size_t));
    if (!begin) return 0;
    size_t *end = begin + needed;
    if (find_segments(s, n, L.scan_start, needed, begin, end) != needed) return 0;

    size_t total = L.scan_start + 2;
    for (int r = 0; r < S->seg_rows; r++) {
        long first = S->first_seg + r * S->row_step;
        total += end[first + S->seg_cols - 1] - begin[first] + 2 * (size_t)S->seg_cols;
    }
    uint8_t *out = (uint8_t *)reserve(&t->splice, total);
    if (!out) return 0;
    memcpy(out, s, L.scan_start);
    write16(out + L.size_pos, S->height);
    write16(out + L.size_pos + 2, S->width);
    size_t o = L.scan_start;
    long j = 0, nseg = (long)S->seg_rows * S->seg_cols;
    for (int r = 0; r < S->seg_rows; r++) {
        long first = S->first_seg + r * S->row_step;
        for (int c = 0; c < S->seg_cols; c++, j++) {
            long k = first + c;
            memcpy(out + o, s + begin[k], end[k] - begin[k]);
            o += end[k] - begin[k];
            if (j + 1 < nseg) {
                out[o++] = 0xFF;
                out[o++] = (uint8_t)(0xD0 + (j & 7));
            }
        }
    }
    out[o++] = 0xFF;
    out[o++] = 0xD9;
    return o;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Resampler                                                                                                */

typedef struct {
    int out, taps;
    int *first;     /* first input index of each output */
    int *count;     /* number of taps of each output */
    float *weight;  /* out x taps, normalised to sum 1 */
} dm_kernel;

static double cubic(double x) {  /* Keys' cubic convolution with a = -0.5 (PIL's and torchvision's bicubic) */
    const double a = -0.5;
    x = fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static size_t kernel_bytes(int out, int taps) {
    return (size_t)out * (2 * sizeof(int) + (size_t)taps * sizeof(float));
}

static int kernel_taps(int in_size, double b0, double b1, int out_size, int area) {
    double scale = (b1 - b0) / out_size, fs = scale > 1.0 ? scale : 1.0;
    double support = (area && scale >= 1.0) ? 0.5 * scale : (area ? 1.0 : 2.0 * fs);
    int taps = (int)ceil(2.0 * support) + 2;
    return taps < in_size ? taps : in_size;
}

/* Weights that resample the input interval [b0, b1) (pixel i covering [i, i+1)) onto out_size pixels.
 * Taps are limited to [0, in_size) and renormalised, as when the box is cut out before resizing. */
static void build_kernel(dm_kernel *k, uint8_t *mem, int in_size, double b0, double b1, int out_size, int area) {
    int taps = kernel_taps(in_size, b0, b1, out_size, area);
    double scale = (b1 - b0) / out_size, fs = scale > 1.0 ? scale : 1.0, inv_fs = 1.0 / fs;
    k->out = out_size;
    k->taps = taps;
    k->first = (int *)mem;
    k->count = k->first + out_size;
    k->weight = (float *)(k->count + out_size);
    for (int i = 0; i < out_size; i++) {
        double lo, hi;
        double center = b0 + (i + 0.5) * scale;
        int box = area && scale >= 1.0;
        if (box) {
            lo = b0 + i * scale;
            hi = lo + scale;
        } else {
            double support = area ? 1.0 : 2.0 * fs;
            lo = center - support;
            hi = center + support;
        }
        int first = (int)floor(lo + (box ? 0.0 : 0.5));
        int last = box ? (int)ceil(hi) : (int)floor(hi + 0.5);
        if (first < 0) first = 0;
        if (last > in_size) last = in_size;
        if (last - first > taps) last = first + taps;
        if (last <= first) {  /* degenerate box at an edge: take the nearest pixel */
            first = (int)floor(center);
            if (first < 0) first = 0;
            if (first > in_size - 1) first = in_size - 1;
            last = first + 1;
        }
        float *w = k->weight + (size_t)i * taps;
        double sum = 0.0;
        for (int x = first; x < last; x++) {
            double v;
            if (box) {
                double a = x > lo ? x : lo, b = x + 1 < hi ? x + 1 : hi;
                v = b > a ? b - a : 0.0;
            } else if (area) {
                v = triangle(x + 0.5 - center);
            } else {
                v = cubic((x + 0.5 - center) * inv_fs);
            }
            w[x - first] = (float)v;
            sum += v;
        }
        if (sum == 0.0) {  /* all taps on zeros of the filter: nearest pixel */
            int nearest = (int)floor(center);
            if (nearest < first) nearest = first;
            if (nearest > last - 1) nearest = last - 1;
            for (int x = first; x < last; x++) w[x - first] = x == nearest ? 1.0f : 0.0f;
        } else {
            const double inv_sum = 1.0 / sum;  /* multiplications: this loop runs for every tap of every crop */
            for (int x = first; x < last; x++) w[x - first] = (float)(w[x - first] * inv_sum);
        }
        k->first[i] = first;
        k->count[i] = last - first;
    }
}

/* The resampler's arithmetic runs on vectors of 8 floats (GCC vector extensions: SSE2 or NEON by default, an
 * AVX2/FMA clone where the CPU has it). */
typedef float v8f __attribute__((vector_size(32)));

enum { CHUNK = 8 };  /* vectors of a row that the vertical filter sums together */

/* Widened rows are padded to whole chunks (CHUNK vectors of 8 floats). */
static size_t pad_chunk(size_t n) { return (n + 8 * CHUNK - 1) & ~(size_t)(8 * CHUNK - 1); }

static void *align64(void *p) { return (void *)(((uintptr_t)p + 63) & ~(uintptr_t)63); }

/* n bytes -> n floats, zero-padded to pad_chunk(n). Plain loops: GCC vectorises these well, but scalarises
 * __builtin_convertvector between byte and float vectors. */
static inline void widen_row(const uint8_t *restrict src, int n, float *restrict dst) {
    for (int x = 0; x < n; x++) dst[x] = (float)src[x];
    for (int x = n; x & (8 * CHUNK - 1); x++) dst[x] = 0.0f;
}

/* The current planar row (luma, Cb, Cr; one chroma sample per `expand` pixels of libjpeg's box-upsampled
 * rows) -> floats, zero-padded to pad_chunk(). */
static inline __attribute__((always_inline)) void widen_planes(const dm_planes *P, float *restrict dst) {
    const uint8_t *restrict y = P->rows[0] + P->luma_first;
    const int n = P->luma_cols + 2 * P->chroma_cols;
    for (int x = 0; x < P->luma_cols; x++) dst[x] = (float)y[x];
    float *restrict d = dst + P->luma_cols;
    for (int c = 1; c < 3; c++, d += P->chroma_cols) {
        const uint8_t *restrict in = P->rows[c] + (size_t)P->chroma_first * P->expand;
        if (P->expand == 2) {
            for (int i = 0; i < P->chroma_cols; i++) d[i] = (float)in[2 * i];
        } else {
            for (int i = 0; i < P->chroma_cols; i++) d[i] = (float)in[(size_t)i * P->expand];
        }
    }
    for (int x = n; x & (8 * CHUNK - 1); x++) dst[x] = 0.0f;
}

/* Round and clamp n floats to bytes. */
static inline void narrow_row(const float *restrict src, int n, uint8_t *restrict dst) {
    for (int x = 0; x < n; x++) {
        int32_t v = (int32_t)(src[x] + 0.5f);  /* integer clamps vectorise better than float ones */
        v = v < 255 ? v : 255;
        v = v > 0 ? v : 0;
        dst[x] = (uint8_t)v;
    }
}

/* A source of an image region's rows, handed out once each, top to bottom: the rows of an uncompressed image
 * in memory, or scanlines that libjpeg decodes on demand (so that a decoded crop never exists as a
 * whole: only the few rows the vertical filter needs at a time). */
typedef struct dm_rows {
    const uint8_t *(*next)(struct dm_rows *self);
    const uint8_t *base;                   /* in memory: first pixel of the region */
    ptrdiff_t stride;                      /* in memory: bytes from one row to the next */
    int index;                             /* rows handed out so far */
    struct jpeg_decompress_struct *cinfo;  /* libjpeg: the decompressor, positioned at the region's first row */
    uint8_t *buffer;                       /* libjpeg: one output scanline */
    size_t offset;                         /* libjpeg: bytes from the scanline's start to the region */
} dm_rows;

static const uint8_t *next_memory_row(dm_rows *s) { return s->base + (ptrdiff_t)(s->index++) * s->stride; }

static const uint8_t *next_jpeg_row(dm_rows *s) {
    JSAMPROW row = s->buffer;
    jpeg_read_scanlines(s->cinfo, &row, 1);  /* errors longjmp out to decode_region */
    s->index++;
    return s->buffer + s->offset;
}

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint8_t v16u __attribute__((vector_size(16)));

enum { GROUP = 8 };  /* output rows resampled together: one float lane per row */

/* In-register transpose of an 8 x 8 block of floats (unpack, shuffle, then swap 128-bit halves). */
static inline void transpose8(v8f *r) {
    const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i even = {0, 1, 8, 9, 4, 5, 12, 13}, odd = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i low_halves = {0, 1, 2, 3, 8, 9, 10, 11}, high_halves = {4, 5, 6, 7, 12, 13, 14, 15};
    v8f t0 = __builtin_shuffle(r[0], r[1], lo), t1 = __builtin_shuffle(r[0], r[1], hi);
    v8f t2 = __builtin_shuffle(r[2], r[3], lo), t3 = __builtin_shuffle(r[2], r[3], hi);
    v8f t4 = __builtin_shuffle(r[4], r[5], lo), t5 = __builtin_shuffle(r[4], r[5], hi);
    v8f t6 = __builtin_shuffle(r[6], r[7], lo), t7 = __builtin_shuffle(r[6], r[7], hi);
    v8f u0 = __builtin_shuffle(t0, t2, even), u1 = __builtin_shuffle(t0, t2, odd);
    v8f u2 = __builtin_shuffle(t1, t3, even), u3 = __builtin_shuffle(t1, t3, odd);
    v8f u4 = __builtin_shuffle(t4, t6, even), u5 = __builtin_shuffle(t4, t6, odd);
    v8f u6 = __builtin_shuffle(t5, t7, even), u7 = __builtin_shuffle(t5, t7, odd);
    r[0] = __builtin_shuffle(u0, u4, low_halves);
    r[1] = __builtin_shuffle(u1, u5, low_halves);
    r[2] = __builtin_shuffle(u2, u6, low_halves);
    r[3] = __builtin_shuffle(u3, u7, low_halves);
    r[4] = __builtin_shuffle(u0, u4, high_halves);
    r[5] = __builtin_shuffle(u1, u5, high_halves);
    r[6] = __builtin_shuffle(u2, u6, high_halves);
    r[7] = __builtin_shuffle(u3, u7, high_halves);
}

/* dst rows r = 0..n-1 (row stride dst_stride) receive bytes (x, r) of src, laid out x-major as src[8 x + r], for
 * x < count: an 8 x 8 byte transpose per 8 columns. */
static inline void scatter_rows(const uint8_t *src, int count, uint8_t *dst, ptrdiff_t dst_stride, int n) {
    int x = 0;
    for (; x + 8 <= count; x += 8) {
        v16u a, b, c, d;
        memcpy(&a, src + 8 * x, 16);
        memcpy(&b, src + 8 * x + 16, 16);
        memcpy(&c, src + 8 * x + 32, 16);
        memcpy(&d, src + 8 * x + 48, 16);
        /* interleave the two 8-byte columns held by each vector, then pairs of pairs */
        const v16u bytes = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};
        a = __builtin_shuffle(a, bytes);
        b = __builtin_shuffle(b, bytes);
        c = __builtin_shuffle(c, bytes);
        d = __builtin_shuffle(d, bytes);
        const v16u pairs_lo = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
        const v16u pairs_hi = {8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31};
        v16u ab0 = __builtin_shuffle(a, b, pairs_lo), ab1 = __builtin_shuffle(a, b, pairs_hi);
        v16u cd0 = __builtin_shuffle(c, d, pairs_lo), cd1 = __builtin_shuffle(c, d, pairs_hi);
        const v16u quads_lo = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
        const v16u quads_hi = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
        v16u rows01 = __builtin_shuffle(ab0, cd0, quads_lo), rows23 = __builtin_shuffle(ab0, cd0, quads_hi);
        v16u rows45 = __builtin_shuffle(ab1, cd1, quads_lo), rows67 = __builtin_shuffle(ab1, cd1, quads_hi);
        const v16u *out[4] = {&rows01, &rows23, &rows45, &rows67};
        for (int r = 0; r < n; r++)
            memcpy(dst + (ptrdiff_t)r * dst_stride + x, (const uint8_t *)out[r >> 1] + 8 * (r & 1), 8);
    }
    for (; x < count; x++)
        for (int r = 0; r < n; r++) dst[(ptrdiff_t)r * dst_stride + x] = src[8 * x + r];
}

/* Horizontal sums of planar YCbCr columns (cols luma values, then ccols Cb and ccols Cr values, each holding a
 * group's 8 rows), converted to RGB (JFIF's YCbCr) for each output column. */
static inline __attribute__((always_inline)) void horizontal_planar(const dm_kernel *luma, const dm_kernel *chroma,
                                                                    const float *columns, int cols, int ccols,
                                                                    float *outputs, int out_w, int flip) {
    const float *cb_columns = columns + (size_t)cols * GROUP, *cr_columns = cb_columns + (size_t)ccols * GROUP;
    for (int j = 0; j < out_w; j++) {
        const float *wy = luma->weight + (size_t)j * luma->taps;
        const float *py = columns + (size_t)luma->first[j] * GROUP;
        v8f y = wy[0] * *(const v8f *)py;
        for (int k = 1; k < luma->count[j]; k++) y += wy[k] * *(const v8f *)(py + (size_t)k * GROUP);
        const float *wc = chroma->weight + (size_t)j * chroma->taps;
        const size_t c0 = (size_t)chroma->first[j] * GROUP;
        v8f cb = wc[0] * *(const v8f *)(cb_columns + c0), cr = wc[0] * *(const v8f *)(cr_columns + c0);
        for (int k = 1; k < chroma->count[j]; k++) {
            cb += wc[k] * *(const v8f *)(cb_columns + c0 + (size_t)k * GROUP);
            cr += wc[k] * *(const v8f *)(cr_columns + c0 + (size_t)k * GROUP);
        }
        cb -= 128.0f;
        cr -= 128.0f;
        float *o = outputs + (size_t)3 * (flip ? out_w - 1 - j : j) * GROUP;
        *(v8f *)o = y + 1.402f * cr;
        *(v8f *)(o + 8) = y - 0.344136f * cb - 0.714136f * cr;
        *(v8f *)(o + 16) = y + 1.772f * cb;
    }
}

/* Resample the box [x0, x1) x [y0, y1) of an RGB region (rows x cols pixels, its rows coming from `src`) to
 * out_h x out_w into dst (contiguous). With `planes`, the rows are planar YCbCr (cols luma samples, then the
 * Cb and the Cr samples of chroma columns whose box is [cx0, cx1)): each plane has its own horizontal filter,
 * and the conversion to RGB happens on the output pixels. GROUP output rows at a time:
 *   1. vertical filter: each output row of the group is a weighted sum of widened input rows (a ring that only
 *      moves forward, so that every input row is read and widened once); 8 x 8 blocks of the sums are
 *      transposed in registers, so that each of the region's values (column, channel) holds the group's 8
 *      rows in one vector;
 *   2. horizontal filter: weighted sums of those vectors, one per output (column, channel), in reverse column
 *      order for a flip;
 *   3. rounding to bytes and an 8 x 8 byte transpose back into the group's rows of dst. */
__attribute__((target_clones("arch=x86-64-v3", "default")))
static int resample(dm_thread *t, dm_rows *src, int rows, int cols, double y0, double y1, double x0, double x1,
                    const dm_planes *planes, double cx0, double cx1, uint8_t *dst, int out_h, int out_w,
                    int flags) {
    int area = (flags & DM_FILTER_AREA) != 0;
    const int ccols = planes ? planes->chroma_cols : 1;
    int taps_v = kernel_taps(rows, y0, y1, out_h, area), taps_h = kernel_taps(cols, x0, x1, out_w, area);
    int taps_c = kernel_taps(ccols, cx0, cx1, out_w, area);
    size_t kv = kernel_bytes(out_h, taps_v), kh = kernel_bytes(out_w, taps_h);
    size_t kc = planes ? kernel_bytes(out_w, taps_c) : 0;
    uint8_t *kmem = (uint8_t *)reserve(&t->kernels, kv + kh + kc +
                                                    (size_t)GROUP * taps_v * (sizeof(float *) + sizeof(float)) + 128);
    if (!kmem) return DM_ERR_NOMEM;
    const float **taps_at = (const float **)align64(kmem + kv + kh + kc); /* [tap][row of group]: ring row */
    float *group_w = (float *)(taps_at + (size_t)GROUP * taps_v);         /* [tap][row of group]: weight */
    dm_kernel vertical, horizontal, chroma;
    build_kernel(&vertical, kmem, rows, y0, y1, out_h, area);
    build_kernel(&horizontal, kmem + kv, cols, x0, x1, out_w, area);
    if (planes) build_kernel(&chroma, kmem + kv + kh, ccols, cx0, cx1, out_w, area);
    /* The ring holds every input row one group of output rows needs. */
    int ring_rows = 1;
    for (int i0 = 0; i0 < out_h; i0 += GROUP) {
        int last = i0 + GROUP - 1 < out_h - 1 ? i0 + GROUP - 1 : out_h - 1;
        int span = vertical.first[last] + vertical.count[last] - vertical.first[i0];
        if (span > ring_rows) ring_rows = span;
    }
    const size_t n1 = planes ? (size_t)cols + 2 * (size_t)ccols : (size_t)3 * cols;  /* values per input row */
    const size_t width = pad_chunk(n1), n2 = (size_t)3 * out_w;
    float *ring = (float *)reserve(&t->ring, (size_t)ring_rows * width * sizeof(float) + 64);
    float *columns = (float *)reserve(&t->columns, (width + 8) * GROUP * sizeof(float) + 64);   /* (x, 8 rows) */
    float *outputs = (float *)reserve(&t->outputs, (n2 + 8) * GROUP * sizeof(float) + 64);
    uint8_t *bytes = (uint8_t *)reserve(&t->bytes, (n2 + 8) * GROUP + 64);
    if (!ring || !columns || !outputs || !bytes) return DM_ERR_NOMEM;
    ring = (float *)align64(ring);
    columns = (float *)align64(columns);
    outputs = (float *)align64(outputs);

    int next = 0;  /* input rows consumed so far */
    for (int i0 = 0; i0 < out_h; i0 += GROUP) {
        const int n = out_h - i0 < GROUP ? out_h - i0 : GROUP;
        const int last = i0 + n - 1;
        /* Rows of this group's window that have not been read yet. */
        for (; next < vertical.first[i0]; next++) src->next(src);
        for (; next < vertical.first[last] + vertical.count[last]; next++) {
            const uint8_t *row = src->next(src);
            float *to = ring + (size_t)(next % ring_rows) * width;
            if (planes) {
                widen_planes(planes, to);  /* from the component rows take_planes kept */
            } else {
                widen_row(row, (int)n1, to);
            }
        }
        /* 1. Vertical sums, transposed to (x, row) vectors. Missing rows of a last, partial group repeat its
         * last row. */
        /* Every row of the group gets the group's largest tap count, padded with zero weights on a valid row,
         * so that the eight sums advance together (eight independent multiply-add chains). */
        int taps = 1;
        for (int r = 0; r < GROUP; r++) {
            int i = i0 + (r < n ? r : n - 1);
            if (vertical.count[i] > taps) taps = vertical.count[i];
        }
        for (int r = 0; r < GROUP; r++) {
            int i = i0 + (r < n ? r : n - 1);
            const float *wi = vertical.weight + (size_t)i * vertical.taps;
            for (int k = 0; k < taps; k++) {
                int kk = k < vertical.count[i] ? k : vertical.count[i] - 1;
                group_w[k * GROUP + r] = k < vertical.count[i] ? wi[k] : 0.0f;
                taps_at[k * GROUP + r] = ring + (size_t)((vertical.first[i] + kk) % ring_rows) * width;
            }
        }
        /* CHUNK vectors of a row at a time: each tap's row pointer and weight are loaded once per chunk. */
        for (size_t x0 = 0; x0 < width; x0 += 8 * CHUNK) {
            v8f block[GROUP][CHUNK];
            for (int r = 0; r < GROUP; r++) {
                v8f acc[CHUNK];
                const float w0 = group_w[r];
                const v8f *p0 = (const v8f *)(taps_at[r] + x0);
                for (int v = 0; v < CHUNK; v++) acc[v] = w0 * p0[v];
                for (int k = 1; k < taps; k++) {
                    const float wk = group_w[k * GROUP + r];
                    const v8f *pk = (const v8f *)(taps_at[k * GROUP + r] + x0);
                    for (int v = 0; v < CHUNK; v++) acc[v] += wk * pk[v];
                }
                for (int v = 0; v < CHUNK; v++) block[r][v] = acc[v];
            }
            for (int v = 0; v < CHUNK; v++) {
                v8f sums[GROUP];
                for (int r = 0; r < GROUP; r++) sums[r] = block[r][v];
                transpose8(sums);
                for (int k = 0; k < 8; k++) *(v8f *)(columns + (x0 + 8 * v + k) * GROUP) = sums[k];
            }
        }
        /* 2. Horizontal sums: output (column j, channel c) from region columns first..first+count-1. */
        const int flip = (flags & DM_FLIP) != 0;
        if (planes) {
            horizontal_planar(&horizontal, &chroma, columns, cols, ccols, outputs, out_w, flip);
            narrow_row(outputs, (int)(n2 * GROUP), bytes);
            scatter_rows(bytes, (int)n2, dst + (size_t)i0 * n2, (ptrdiff_t)n2, n);
            continue;
        }
        for (int j = 0; j < out_w; j++) {
            const float *wj = horizontal.weight + (size_t)j * horizontal.taps;
            const float *base = columns + (size_t)3 * horizontal.first[j] * GROUP;
            v8f r = wj[0] * *(const v8f *)base, g = wj[0] * *(const v8f *)(base + 8);
            v8f b = wj[0] * *(const v8f *)(base + 16);
            for (int k = 1; k < horizontal.count[j]; k++) {
                const float wk = wj[k], *p = base + (size_t)3 * k * GROUP;
                r += wk * *(const v8f *)p;
                g += wk * *(const v8f *)(p + 8);
                b += wk * *(const v8f *)(p + 16);
            }
            float *o = outputs + (size_t)3 * (flip ? out_w - 1 - j : j) * GROUP;
            *(v8f *)o = r;
            *(v8f *)(o + 8) = g;
            *(v8f *)(o + 16) = b;
        }
        /* 3. Bytes, back into rows. */
        narrow_row(outputs, (int)(n2 * GROUP), bytes);
        scatter_rows(bytes, (int)n2, dst + (size_t)i0 * n2, (ptrdiff_t)n2, n);
    }
    return DM_OK;
}

/* ------------------------------------------------------------------------------------------------------ */
/* Public entry points                                                                                      */

static int check_sizes(dm_thread *t, int32_t h, int32_t w, int32_t out_h, int32_t out_w) {
    if (h < 1 || w < 1 || h > DM_MAX_SIDE || w > DM_MAX_SIDE) {
        snprintf(t->message, MSG_LEN, "crop size %dx%d must be in [1, %d]", (int)h, (int)w, DM_MAX_SIDE);
        return DM_ERR_ARGS;
    }
    if (out_h < 1 || out_w < 1 || out_h > DM_MAX_SIDE || out_w > DM_MAX_SIDE) {
        snprintf(t->message, MSG_LEN, "output size %dx%d must be in [1, %d]", (int)out_h, (int)out_w,
                 DM_MAX_SIDE);
        return DM_ERR_ARGS;
    }
    return DM_OK;
}

static int check_box(dm_thread *t, int32_t top, int32_t left, int32_t h, int32_t w, int height, int width) {
    if (top < 0 || left < 0 || (int64_t)top + h > height || (int64_t)left + w > width) {
        snprintf(t->message, MSG_LEN, "crop box (top=%d, left=%d, height=%d, width=%d) is outside the %dx%d image",
                 (int)top, (int)left, (int)h, (int)w, height, width);
        return DM_ERR_ARGS;
    }
    return DM_OK;
}

typedef struct {
    const uint8_t *data;
    size_t size;
    int top, left, h, w;  /* crop box in the pixels of `data` */
    int denom, flags;     /* DCT scale 1/denom */
    uint8_t *dst;
    int out_h, out_w;
    int32_t *info;
} dm_request;

/* libjpeg's colour converter, replaced: instead of converting upsampled YCbCr to RGB, it keeps pointers to the
 * component rows (valid until libjpeg produces the next row), which the resampler widens right away. libjpeg's
 * own row skipping swaps it for a no-op while it discards rows, and puts it back. Rows are read one at a time. */
static void take_planes(j_decompress_ptr cinfo, JSAMPIMAGE input_buf, JDIMENSION input_row, JSAMPARRAY output_buf,
                        int num_rows) {
    (void)output_buf;
    if (num_rows < 1) return;
    dm_planes *P = &((dm_thread *)((char *)cinfo - offsetof(dm_thread, cinfo)))->planes;
    for (int c = 0; c < 3; c++) P->rows[c] = input_buf[c][input_row];
}

#if JPEG_LIB_VERSION >= 70
#define DCT_SIZE_OF(c) ((c)->DCT_h_scaled_size)
#define MIN_DCT_SIZE_OF(cinfo) ((cinfo)->min_DCT_h_scaled_size)
#else
#define DCT_SIZE_OF(c) ((c)->DCT_scaled_size)
#define MIN_DCT_SIZE_OF(cinfo) ((cinfo)->min_DCT_scaled_size)
#endif

/* Pixels per chroma sample along a row (libjpeg's horizontal upsampling factor) if the image is YCbCr whose
 * rows are worth resampling as planes: full-resolution luma, Cb and Cr alike, subsampled by an integral
 * factor. 0 otherwise, and for chroma at full resolution (4:4:4, or 4:2:0 at a reduced DCT scale, where libjpeg
 * scales chroma up in the IDCT): there the planes save the resampler nothing, and libjpeg's SIMD colour
 * conversion beats converting on the output (measured: 0.90x on 4:4:4 at 224 px). Needs the output dimensions
 * (jpeg_calc_output_dimensions). */
static int planar_expand(const struct jpeg_decompress_struct *cinfo) {
    if (cinfo->jpeg_color_space != JCS_YCbCr || cinfo->num_components != 3) return 0;
    int expand[3];
    for (int c = 0; c < 3; c++) {
        const jpeg_component_info *comp = &cinfo->comp_info[c];
        int in_group = comp->h_samp_factor * DCT_SIZE_OF(comp) / MIN_DCT_SIZE_OF(cinfo);
        if (in_group < 1 || cinfo->max_h_samp_factor % in_group) return 0;
        expand[c] = cinfo->max_h_samp_factor / in_group;
    }
    return expand[0] == 1 && expand[1] == expand[2] && expand[1] >= 2 && expand[1] <= 4 ? expand[1] : 0;
}

/* libjpeg part of dm_decode_crop, resampling included (rows are decoded as the resampler asks for them);
 * libjpeg errors longjmp to decode_region. */
static int decode_region_unguarded(dm_thread *t, const dm_request *q) {
    struct jpeg_decompress_struct *cinfo = &t->cinfo;
    const int d = q->denom;
    jpeg_mem_src(cinfo, q->data, (unsigned long)q->size);
    jpeg_read_header(cinfo, TRUE);
    int rc = check_box(t, q->top, q->left, q->h, q->w, (int)cinfo->image_height, (int)cinfo->image_width);
    if (rc) return rc;
    cinfo->out_color_space = JCS_RGB;
    cinfo->scale_num = 1;
    cinfo->scale_denom = (unsigned)d;
    cinfo->dct_method = (q->flags & DM_FAST_IDCT) ? JDCT_IFAST : JDCT_ISLOW;
    cinfo->do_fancy_upsampling = (q->flags & DM_FAST_UPSAMPLING) ? FALSE : TRUE;
    /* Subsampled YCbCr is resampled as planes, chroma at its own resolution: libjpeg neither interpolates chroma
     * (box upsampling, whose rows take_planes hands to the resampler) nor converts colours; the resampler does
     * less work on subsampled chroma and converts only the output's pixels. */
    int expand = 0;
    if (!(q->flags & DM_RGB_ROWS)) {
        jpeg_calc_output_dimensions(cinfo);
        expand = planar_expand(cinfo);
    }
    if (expand) {
        cinfo->out_color_space = JCS_YCbCr;
        cinfo->do_fancy_upsampling = FALSE;
    }
    jpeg_start_decompress(cinfo);

    /* The box at the DCT scale, and the whole rows/columns that contain it. */
    int scaled_w = (int)cinfo->output_width, scaled_h = (int)cinfo->output_height;
    int y0 = q->top / d, y1 = (q->top + q->h + d - 1) / d;
    int x0 = q->left / d, x1 = (q->left + q->w + d - 1) / d;
    if (y1 > scaled_h) y1 = scaled_h;
    if (x1 > scaled_w) x1 = scaled_w;
    JDIMENSION xoffset = 0, crop_width = (JDIMENSION)scaled_w;
    /* columns of context on each side, at the DCT scale (none without chroma interpolation) */
    int m = expand ? 0 : (context_margin(d) + d - 1) / d;
    int cx0 = x0 > m ? x0 - m : 0, cx1 = x1 + m < scaled_w ? x1 + m : scaled_w;
    if (cx0 > 0 || cx1 < scaled_w) {
        xoffset = (JDIMENSION)cx0;
        crop_width = (JDIMENSION)(cx1 - cx0);
        jpeg_crop_scanline(cinfo, &xoffset, &crop_width);  /* widens to whole iMCU columns */
    }
    /* Our Huffman decoder, which with a crop index in the file (dm_index_add) decodes only the MCUs libjpeg
     * uses: none of the rows above the crop, none of the columns beside it. */
    dm_index index;
    int indexed = 0;
    if (!(q->flags & DM_LIBJPEG_HUFFMAN)) {
        int has_index = !(q->flags & DM_NO_INDEX) && dm_index_find(q->data, q->size, &index);
        indexed = dm_entropy_install(&t->entropy, cinfo, has_index ? &index : NULL, (int)xoffset,
                                     crop_width < (JDIMENSION)scaled_w ? (int)crop_width : 0, y1) == 2;
    }
    uint8_t *row = (uint8_t *)reserve(&t->scanline, (size_t)cinfo->output_width * 3 + 128);
    if (!row) return DM_ERR_NOMEM;
    /* libjpeg-turbo's SIMD colour conversion writes rows that start on a 32-byte boundary with non-temporal
     * stores, which bypass the cache: the resampler would then read every decoded row back from memory
     * (measured: about half of the resampling time). A row 16 bytes past such a boundary takes the regular
     * stores and stays in L1. */
    row = (uint8_t *)align64(row) + 16;
    /* The box in the columns of the (cropped) output row, and in chroma samples for planar rows. */
    const double bx0 = (double)q->left / d - (double)xoffset, bx1 = (double)(q->left + q->w) / d - (double)xoffset;
    dm_planes *planes = NULL;
    double chroma_x0 = 0.0, chroma_x1 = 0.0;
    if (expand) {
        planes = &t->planes;
        planes->expand = expand;
        planes->luma_first = x0 - (int)xoffset;
        planes->luma_cols = x1 - x0;
        planes->chroma_first = planes->luma_first / expand;
        planes->chroma_cols = (x1 - (int)xoffset + expand - 1) / expand - planes->chroma_first;
        chroma_x0 = bx0 / expand - planes->chroma_first;
        chroma_x1 = bx1 / expand - planes->chroma_first;
        cinfo->cconvert->color_convert = take_planes;
    }
    if (y0 > 0) jpeg_skip_scanlines(cinfo, (JDIMENSION)y0);
    if (q->info) {
        q->info[DM_INFO_DENOM] = d;
        q->info[DM_INFO_ROWS] = y1 - y0;
        q->info[DM_INFO_COLS] = (int32_t)crop_width;
        q->info[DM_INFO_INDEXED] = indexed;
        q->info[DM_INFO_PLANAR] = expand != 0;
    }
    dm_rows src = {next_jpeg_row, NULL, 0, 0, cinfo, row, expand ? 0 : (size_t)(x0 - (int)xoffset) * 3};
    if (q->flags & DM_DECODE_ONLY) {
        for (int r = y0; r < y1; r++) src.next(&src);
        return DM_OK;
    }
    return resample(t, &src, y1 - y0, x1 - x0, (double)q->top / d - y0, (double)(q->top + q->h) / d - y0,
                    bx0 - (x0 - (int)xoffset), bx1 - (x0 - (int)xoffset), planes, chroma_x0, chroma_x1, q->dst, q->out_h,
                    q->out_w, q->flags);
}

static int decode_region(dm_thread *t, const dm_request *q) {
    int rc;
    if (setjmp(t->err.jump)) {
        rc = DM_ERR_JPEG;
    } else {
        rc = decode_region_unguarded(t, q);
    }
    jpeg_abort_decompress(&t->cinfo);  /* we stop after the crop's last row: abort, not finish */
    return rc;
}

/* Decode the crop box (top, left, h, w) of a JPEG and resample it to out_h x out_w RGB into dst. */
int dm_decode_crop(const uint8_t *src, uint64_t size, int32_t top, int32_t left, int32_t h, int32_t w,
                   uint8_t *dst, int32_t out_h, int32_t out_w, int32_t flags, int32_t *info) {
    dm_thread *t = thread_state();
    if (!t) return DM_ERR_NOMEM;
    int rc = check_sizes(t, h, w, out_h, out_w);
    if (rc) return rc;
    dm_request q = {src, (size_t)size, top, left, h, w, 1, flags, dst, out_h, out_w, info};
    if (!(flags & DM_NO_DCT_SCALING)) q.denom = dm_dct_denominator(h, w, out_h, out_w);
    dm_selection S;
    int margin = context_margin(q.denom);
    size_t spliced = (flags & DM_NO_SPLICE) ? 0 : splice(t, src, (size_t)size, top, left, h, w, margin, &S);
    if (spliced) {  /* the same box inside the spliced image */
        q.data = t->splice.data;
        q.size = spliced;
        q.top -= S.origin_y;
        q.left -= S.origin_x;
    }
    if (info) info[DM_INFO_SPLICED] = spliced ? 1 : 0;
    return decode_region(t, &q);
}

/* Same resampling for an uncompressed RGB image (height x width x 3, contiguous). */
int dm_resize_crop(const uint8_t *src, int32_t height, int32_t width, int32_t top, int32_t left, int32_t h,
                   int32_t w, uint8_t *dst, int32_t out_h, int32_t out_w, int32_t flags) {
    dm_thread *t = thread_state();
    if (!t) return DM_ERR_NOMEM;
    int rc = check_sizes(t, h, w, out_h, out_w);
    if (!rc) rc = check_box(t, top, left, h, w, height, width);
    if (rc) return rc;
    dm_rows rows = {next_memory_row, src + ((size_t)top * width + left) * 3, (ptrdiff_t)width * 3, 0, NULL, NULL, 0};
    return resample(t, &rows, h, w, 0.0, h, 0.0, w, NULL, 0.0, 0.0, dst, out_h, out_w, flags);
}

/* The calling thread's message for its last failed call. */
const char *dm_error_message(void) {
    dm_thread *t = thread_state();
    return t ? t->message : "out of memory";
}

/* Loader-side error record: an int64 array [count, first failing sample, message bytes...]. The first
 * failure (over all threads) stores its sample index and this thread's message. */
void dm_record_error(int64_t *record, int64_t record_bytes, int64_t sample, int32_t code) {
    if (__atomic_fetch_add(&record[0], 1, __ATOMIC_ACQ_REL) != 0) return;
    record[1] = sample;
    char *text = (char *)(record + 2);
    size_t room = (size_t)record_bytes - 2 * sizeof(int64_t);
    const char *message = code == DM_ERR_NOMEM ? "out of memory" : dm_error_message();
    if (room > 0) snprintf(text, room, "%s", message);
}

#ifndef DM_NO_PYTHON
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_jpeg_crop",
                                        "C kernels of dailymae_jax.data.decode, called through ctypes.", -1,
                                        NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpeg_crop(void) { return PyModule_Create(&module_def); }
#endif
