/* Crop index of a JPEG, and the Huffman decoder that uses it (_jpeg_index.c).
 *
 * A baseline JPEG without restart markers has no way into its entropy-coded data but from the top: to decode a
 * crop, libjpeg must Huffman-decode every MCU from the first row down to the crop's last row. The crop index is
 * an APP9 segment, written once with the dataset, that records where MCU rows (and every `step`-th MCU inside
 * a row) start in the bit stream, with the DC predictors at that point. With it, the decoder below jumps over
 * the rows above a crop and the MCUs beside it. Other decoders skip the segment as they skip any APPn: the
 * file stays a standard JPEG and decodes to the same pixels everywhere.
 */
#ifndef DM_JPEG_INDEX_H
#define DM_JPEG_INDEX_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <jpeglib.h>

/* A crop index found in a file (pointers into the file's bytes). */
typedef struct {
    const uint8_t *entries;  /* mcus_y * per_row entries of entry_bytes each, row-major */
    int step;                /* MCUs between entries inside a row */
    int per_row;             /* entries per MCU row: ceil(mcus_x / step) */
    int mcus_x, mcus_y, ncomp, entry_bytes;
} dm_index;

/* The marker segment of a JPEG header that starts at *pos (fill bytes 0xFF allowed before it): its marker and
 * the offset and length of its payload (after the length field); *pos moves past it. Returns 0 at the end of
 * the data, a malformed length or a standalone marker (a header has none). */
int dm_next_segment(const uint8_t *data, size_t size, size_t *pos, int *marker, size_t *payload, size_t *length);

typedef struct dm_entropy dm_entropy;  /* our Huffman decoder: tables and bit-reader state */

/* Find and check a crop index in a JPEG (SOI up to the first SOS). Returns 1 if one was found whose sizes
 * match the file, else 0. */
int dm_index_find(const uint8_t *data, size_t size, dm_index *index);

/* Take over Huffman decoding from libjpeg (call after jpeg_start_decompress and jpeg_crop_scanline, before any
 * row is read) for a single-scan baseline Huffman JPEG. With an index (may be NULL) and no restart markers, the
 * MCUs libjpeg will not use are never decoded: those beside the columns it outputs (output pixels
 * [xoffset, xoffset + width) at the DCT scale, as jpeg_crop_scanline set them; width 0: all columns) and those
 * it discards (rows jpeg_skip_scanlines skips); rows_end (> 0: the output row, at the DCT scale, past the last
 * one that will be read) lets it decode the rows it uses two at a time, which is faster. Returns 2 if installed
 * with the index, 1 if installed without (none given, or one that does not fit the file), 0 if the file is one
 * libjpeg must decode itself. *entropy is allocated on first use; free it with dm_entropy_free(). */
int dm_entropy_install(dm_entropy **entropy, j_decompress_ptr cinfo, const dm_index *index, int xoffset,
                       int width, int rows_end);

/* Frees what dm_entropy_install allocated (NULL is fine). */
void dm_entropy_free(dm_entropy *entropy);

/* Copy of the JPEG `src` with a crop index (an entry every `spacing` pixels of an MCU row, rounded down to whole
 * MCUs, at least one; more where the index would not fit one segment) into dst (capacity cap; size + 65540 is always enough). Returns the new size; 0 if
 * the file gets no index (progressive, restart markers, arithmetic coding, or already indexed: dst untouched);
 * or -1 if the JPEG is invalid, with a message in `message` (message_len bytes). */
int64_t dm_index_add(const uint8_t *src, uint64_t size, int32_t spacing, uint8_t *dst, uint64_t cap, char *message,
                     int32_t message_len);

#endif
