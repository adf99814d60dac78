// Structured reply chunks, for clients that negotiated NBD_OPT_STRUCTURED_REPLY: the chunk
// header and error chunks.
import { CHUNK_HEADER_BYTES, ReplyFlag, ReplyType, STRUCTURED_REPLY_MAGIC } from './protocol';

/** The client's 64-bit cookie, echoed in every chunk of its reply. */
export interface Cookie {
  cookieHi: number;
  cookieLo: number;
}

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
