// Structured reply chunks, for clients that negotiated NBD_OPT_STRUCTURED_REPLY: the chunk
// header, error chunks, and the block status reply built from a device's extents.
import type { Extent } from '../../block-device';
import { CHUNK_HEADER_BYTES, ReplyFlag, ReplyType, STRUCTURED_REPLY_MAGIC } from './protocol';

/** The client's 64-bit cookie, echoed in every chunk of its reply. */
export interface Cookie {
  cookieHi: number;
  cookieLo: number;
}

/** Descriptors in one block status chunk (8 bytes each): the client asks again for the rest. */
export const MAX_STATUS_DESCRIPTORS = 64 * 1024;

/** Fills the chunk header at the start of `chunk`, whose payload is the rest of it. */
export function writeChunkHeader(chunk: Buffer, cookie: Cookie, type: number, flags: number): void {
  chunk.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  chunk.writeUInt16BE(flags, 4);
  chunk.writeUInt16BE(type, 6);
  chunk.writeUInt32BE(cookie.cookieHi, 8);
  chunk.writeUInt32BE(cookie.cookieLo, 12);
  chunk.writeUInt32BE(chunk.length - CHUNK_HEADER_BYTES, 16);
}

/** The final chunk of a failed request: its errno and a message for a human. */
export function errorChunk(cookie: Cookie, errno: number, message: string): Buffer {
  // 1024 UTF-16 units stay within the spec's 4096-byte limit for strings.
  const text = Buffer.from(message.slice(0, 1024), 'utf8');
  const chunk = Buffer.allocUnsafe(CHUNK_HEADER_BYTES + 6 + text.length);
  writeChunkHeader(chunk, cookie, ReplyType.ERROR, ReplyFlag.DONE);
  chunk.writeUInt32BE(errno, CHUNK_HEADER_BYTES);
  chunk.writeUInt16BE(text.length, CHUNK_HEADER_BYTES + 4);
  text.copy(chunk, CHUNK_HEADER_BYTES + 6);
  return chunk;
}

/**
 * What one context reports for a request of `length` bytes: the device's extents, clipped to
 * the request, neighbours with the same flags merged (the spec asks for distinct neighbours),
 * and no more than one if the client asked for one (REQ_ONE) or `MAX_STATUS_DESCRIPTORS`.
 * Throws if the device broke its contract (nothing, or an empty extent).
 */
export function statusDescriptors(
  extents: readonly Extent[],
  length: number,
  one: boolean,
): Extent[] {
  const limit = one ? 1 : MAX_STATUS_DESCRIPTORS;
  const out: Extent[] = [];
  let covered = 0;
  for (const e of extents) {
    if (covered === length) break;
    if (!Number.isSafeInteger(e.length) || e.length <= 0)
      throw new Error(`metadata context reported an extent of ${e.length} bytes`);
    const n = Math.min(e.length, length - covered);
    const last = out[out.length - 1];
    if (last?.flags === e.flags) last.length += n;
    else if (out.length < limit) out.push({ length: n, flags: e.flags });
    else break;
    covered += n;
  }
  if (out.length === 0) throw new Error('metadata context reported no extent');
  return out;
}

/**
 * The whole reply to a BLOCK_STATUS: one chunk per selected context, `reports[i]` being the
 * extents of the context with id i + 1, the last chunk marked done.
 */
export function blockStatusReply(
  cookie: Cookie,
  reports: readonly (readonly Extent[])[],
  length: number,
  one: boolean,
): Buffer {
  const described = reports.map((extents) => statusDescriptors(extents, length, one));
  const bytes = described.reduce((sum, d) => sum + CHUNK_HEADER_BYTES + 4 + 8 * d.length, 0);
  const reply = Buffer.allocUnsafe(bytes);
  let at = 0;
  described.forEach((descriptors, i) => {
    const size = CHUNK_HEADER_BYTES + 4 + 8 * descriptors.length;
    const chunk = reply.subarray(at, at + size);
    const done = i === described.length - 1 ? ReplyFlag.DONE : 0;
    writeChunkHeader(chunk, cookie, ReplyType.BLOCK_STATUS, done);
    chunk.writeUInt32BE(i + 1, CHUNK_HEADER_BYTES);
    let d = CHUNK_HEADER_BYTES + 4;
    for (const { length: n, flags } of descriptors) {
      chunk.writeUInt32BE(n, d);
      chunk.writeUInt32BE(flags, d + 4);
      d += 8;
    }
    at += size;
  });
  return reply;
}
