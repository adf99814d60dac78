// Wire constants of the NBD protocol (NetworkBlockDevice doc/proto.md): fixed-newstyle
// negotiation, simple and structured replies, metadata contexts. Numbers are the spec's; names
// follow it without the prefix.

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 2 ** 31 + 1,
  ERR_POLICY: 2 ** 31 + 2,
  ERR_INVALID: 2 ** 31 + 3,
  ERR_TLS_REQD: 2 ** 31 + 5,
  ERR_UNKNOWN: 2 ** 31 + 6,
  ERR_SHUTDOWN: 2 ** 31 + 7,
  ERR_TOO_BIG: 2 ** 31 + 9,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  CAN_MULTI_CONN: 1 << 8,
  SEND_CACHE: 1 << 10,
} as const;

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CommandFlag = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3 } as const;

export const ReplyFlag = { DONE: 1 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 2 ** 15 + 1,
  ERROR_OFFSET: 2 ** 15 + 2,
} as const;

/** Error values carried in replies: Linux errno numbers, as the spec requires. */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrno = (typeof NbdErrno)[keyof typeof NbdErrno];

export const REQUEST_HEADER_BYTES = 28;
export const SIMPLE_REPLY_BYTES = 16;
export const CHUNK_HEADER_BYTES = 20;
/** A read's structured reply: the chunk header and the data's offset, then the data. */
export const DATA_CHUNK_HEADER_BYTES = CHUNK_HEADER_BYTES + 8;
export const OPTION_HEADER_BYTES = 16;
/** Longest string (export name, context name or query, message) the spec allows. */
export const MAX_NAME_BYTES = 4096;
/** Longest option payload we read; longer ones are answered ERR_TOO_BIG and skipped. */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Advertised block sizes: any byte granularity works, 4 KiB is best, 32 MiB per request. */
export const MIN_BLOCK = 1;
export const PREFERRED_BLOCK = 4096;
export const MAX_PAYLOAD = 32 * 1024 * 1024;
