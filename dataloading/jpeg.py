"""Is this JPEG safe to hand to DALI's decoder? One check, shared by `seer data pack` (which re-encodes or refuses
what fails it) and the loaders' guard (which replaces what slipped past ingest). No DALI import: pack runs without.
"""
from __future__ import annotations

import re

# Written into manifest.json by `seer data pack` when every stored JPEG passed jpeg_problem: the loaders then skip
# their per-sample guard. Bump it when jpeg_problem accepts less, so older packs are checked again while loading.
JPEG_CHECK = "jpeg_problem/1"

# What the guard accepts: the JPEG processes DALI decodes (baseline, extended, progressive; 8-bit; gray, YCbCr/RGB,
# CMYK). The checks mirror the conditions under which libjpeg-turbo (DALI's CPU JPEG decoder) stops with an error
# instead of a warning. Anything else (lossless, hierarchical, arithmetic coding, 12-bit) is replaced too.
_FRAME_MARKERS = {0xC0: False, 0xC1: False, 0xC2: True}  # SOF0 baseline, SOF1 extended, SOF2 progressive
_MARKERS_WITHOUT_SEGMENT = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM and the restart markers
# Inside entropy-coded data FF is followed by 00 (stuffing) or a restart marker; anything else is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb warning limit (~9459^2)
# DALI 2.4's random_resized_crop segfaulted on valid JPEGs 41,000-50,000 px tall (64-640 px wide; 40,000 and 65,000
# did not): longer sides are refused, far above any camera's (panoramas up to 32,768 px pass).
MAX_SIDE = 32768
_MAX_BLOCKS_PER_MCU = 10  # libjpeg's limit for a scan of several components


def jpeg_problem(data) -> str | None:
    """Why these encoded bytes must not reach DALI's decoder, or None when they form a complete, decodable JPEG.

    Walks every marker segment from start to end-of-image and checks the frame, Huffman and quantization tables
    and scan headers; the entropy-coded data between them is only searched for the next marker (a regex at C
    speed): libjpeg-turbo decodes damage inside it to wrong pixels with a warning. Tens of microseconds per photo
    (`seer bench data` reports it). Damaged JPEGs that it accepts go through DALI's decoder and the train graph
    without an error (a test runs 64 at batch 32; ~3,000 while it was written).
    """
    view = bytes(memoryview(data))  # a copy (microseconds), but indexing bytes is several times faster
    size = len(view)
    if size < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return "not a JPEG" if size else "empty"
    frame, progressive, quant, huffman, scans = None, False, set(), set(), 0
    pos = 2
    while pos + 2 <= size:
        marker = view[pos + 1]
        if view[pos] != 0xFF:
            return "corrupt header"
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return None if scans else "no image data"
        if marker in _MARKERS_WITHOUT_SEGMENT:
            pos += 2
            continue
        end = pos + 2 + (view[pos + 2] << 8 | view[pos + 3] if pos + 4 <= size else 0)
        if end < pos + 4 or end > size:
            return "truncated"
        segment = view[pos + 4 : end]
        if marker in _FRAME_MARKERS:
            problem = "two frame headers" if frame is not None else _frame_problem(segment)
            frame, progressive = _frame_components(segment), _FRAME_MARKERS[marker]
        elif marker == 0xC4:
            problem = _huffman_problem(segment, huffman)
        elif marker == 0xDB:
            problem = _quant_problem(segment, quant)
        elif marker == 0xDD:  # restart interval
            problem = None if len(segment) == 2 else "corrupt restart interval"
        elif marker == 0xDA:  # start of scan: entropy-coded data follows up to the next marker
            problem = _scan_problem(segment, frame, progressive, quant, huffman)
            if problem is None:
                following = _NEXT_MARKER.search(view, end)
                if following is None:
                    return "truncated (no end-of-image marker)"
                end = following.start()
                scans += 1
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:  # application data, comments
            problem = None
        else:
            problem = f"unsupported marker FF{marker:02X}"
        if problem:
            return problem
        pos = end
    return "truncated"


def _frame_components(segment) -> dict[int, tuple[int, int, int]] | None:
    """Component id -> (horizontal sampling, vertical sampling, quantization table) of a frame header."""
    count = segment[5] if len(segment) >= 6 else 0
    if len(segment) != 6 + 3 * count:
        return None
    fields = [segment[6 + 3 * i : 9 + 3 * i] for i in range(count)]
    return {cid: (hv >> 4, hv & 15, table) for cid, hv, table in fields}


def _frame_problem(segment) -> str | None:
    components = _frame_components(segment)
    if components is None or len(components) not in (1, 3, 4) or len(components) != segment[5]:
        return "corrupt frame header"
    if segment[0] != 8:
        return f"{segment[0]}-bit samples (8 needed)"
    height, width = segment[1] << 8 | segment[2], segment[3] << 8 | segment[4]
    if height == 0 or width == 0:
        return "no image size"
    if max(height, width) > MAX_SIDE:
        return f"a side longer than {MAX_SIDE} px"
    if height * width > MAX_PIXELS:
        return "too many pixels"
    factors = list(components.values())
    max_h, max_v = max(f[0] for f in factors), max(f[1] for f in factors)
    if any(not (1 <= h <= 4 and 1 <= v <= 4) or max_h % h or max_v % v or table > 3 for h, v, table in factors):
        return "unsupported chroma subsampling"
    return None


def _quant_problem(segment, defined: set) -> str | None:
    pos = 0
    while pos < len(segment):
        precision, table = segment[pos] >> 4, segment[pos] & 15
        pos += 1 + 64 * (precision + 1)
        if precision > 1 or table > 3 or pos > len(segment):
            return "corrupt quantization table"
        defined.add(table)
    return None


def _huffman_problem(segment, defined: set) -> str | None:
    pos = 0
    while pos < len(segment):
        if pos + 17 > len(segment):
            return "corrupt Huffman table"
        kind, table, counts = segment[pos] >> 4, segment[pos] & 15, segment[pos + 1 : pos + 17]
        values = segment[pos + 17 : pos + 17 + sum(counts)]
        if kind > 1 or table > 3 or len(values) != sum(counts) or (kind == 0 and max(values, default=0) > 15):
            return "corrupt Huffman table"
        code = 0  # canonical codes: at each length, the codes so far must fit without the all-ones code
        for length, count in enumerate(counts[: max((i + 1 for i, c in enumerate(counts) if c), default=0)], 1):
            code += count
            if code >= 1 << length:
                return "corrupt Huffman table"
            code <<= 1
        defined.add((kind, table))
        pos += 17 + len(values)
    return None


def _scan_problem(segment, frame, progressive: bool, quant: set, huffman: set) -> str | None:
    if frame is None:
        return "scan before the frame header"
    count = segment[0] if len(segment) else 0
    if not 1 <= count <= 4 or len(segment) != 4 + 2 * count:
        return "corrupt scan header"
    ids, tables = segment[1 : 1 + 2 * count : 2], segment[2 : 2 + 2 * count : 2]
    if len(set(ids)) != count or any(cid not in frame for cid in ids):
        return "corrupt scan header"
    if count > 1 and sum(frame[cid][0] * frame[cid][1] for cid in ids) > _MAX_BLOCKS_PER_MCU:
        return "corrupt scan header"
    start, stop, high, low = segment[-3], segment[-2], segment[-1] >> 4, segment[-1] & 15
    if progressive and ((start == 0 and stop != 0) or (start > 0 and (stop < start or stop > 63 or count != 1))
                        or (high and low != high - 1) or low > 13):
        return "corrupt progressive scan"
    if any(frame[cid][2] not in quant for cid in ids):
        return "quantization table not defined"
    needs_dc = not progressive or (start == 0 and high == 0)
    needs_ac = not progressive or start > 0
    for selectors in tables:
        if (needs_dc and (0, selectors >> 4) not in huffman) or (needs_ac and (1, selectors & 15) not in huffman):
            return "Huffman table not defined"
    return None
