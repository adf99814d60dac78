// Sockets that read into buffers the protocol chooses (Node's `onread`): a reused scratch
// buffer, or straight into the payload a message is being received into. Node hands
// caller-supplied read buffers only to sockets it constructs, not to ones a server accepts, so
// an accepted (still paused: `pauseOnConnect`) handle is re-wrapped in a socket that has them.
import net from 'node:net';

export interface ReadTarget {
  /** The buffer the next read should fill; asked after each read (and once up front). */
  readBuffer(): Buffer;
  /** `n` bytes just landed at the start of `buf`, a buffer `readBuffer()` returned. */
  onRead(n: number, buf: Buffer): void;
}

/**
 * Re-wraps a paused accepted socket; reads go where `target()` says. `target` may return
 * undefined until the protocol object exists (Node asks for a buffer before the first read).
 */
export function adoptAccepted(
  accepted: net.Socket,
  fallback: Buffer,
  target: () => ReadTarget | undefined,
): net.Socket {
  const socket = new net.Socket({
    handle: (accepted as unknown as { _handle: unknown })._handle,
    onread: {
      buffer: () => target()?.readBuffer() ?? fallback,
      callback: (n: number, buf: Uint8Array) => {
        target()!.onRead(n, buf as Buffer);
        return true;
      },
    },
  } as net.SocketConstructorOpts);
  (accepted as unknown as { _handle: unknown })._handle = null;
  accepted.destroy(); // releases the server's count of it; the handle lives on in `socket`
  return socket;
}

/**
 * The same for a socket that only emits 'data' (a server-side TLS socket, which takes no
 * `onread`): each chunk is copied to where `target` wants it, a buffer at a time.
 */
export function feedReads(socket: net.Socket, target: ReadTarget): void {
  socket.on('data', (chunk: Buffer) => {
    let at = 0;
    while (at < chunk.length) {
      const into = target.readBuffer();
      const n = chunk.copy(into, 0, at, Math.min(chunk.length, at + into.length));
      at += n;
      target.onRead(n, into);
    }
  });
}
