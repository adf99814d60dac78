// Sockets that read into buffers the protocol chooses (Node's `onread`): a reused scratch
// buffer, or straight into the payload a message is being received into. Node hands
// caller-supplied read buffers only to sockets it constructs, not to ones a server accepts, so
// an accepted (still paused: `pauseOnConnect`) handle is re-wrapped in a socket that has them.
import net from 'node:net';
import tls from 'node:tls';

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

/** The handle `AdoptedTlsSocket` wraps while it is being constructed. */
let adopting: unknown;

/**
 * Node honours `onread` only for a TLS socket that made its own connection, not for one given
 * an accepted socket to wrap; this one is given the accepted handle as if it had made it.
 * (`_wrapHandle` is Node's, undocumented, and the runtime we ship is pinned: see adoptAcceptedTls.)
 */
class AdoptedTlsSocket extends tls.TLSSocket {
  _wrapHandle(wrap: unknown, handle: unknown, active: unknown): unknown {
    const base = tls.TLSSocket.prototype as unknown as {
      _wrapHandle(w: unknown, h: unknown, a: unknown): unknown;
    };
    return base._wrapHandle.call(this, wrap, handle ?? adopting, active);
  }
}

/**
 * The server end of a TLS session over a paused accepted connection, whose decrypted reads go
 * where `target()` says, as `adoptAccepted`'s do: a data port receiving gigabytes allocates
 * nothing per read (with 'data' events, a 16 KiB buffer per TLS record, and the GC to match:
 * measured ~20 % of a secondary's CPU).
 */
export function adoptAcceptedTls(
  accepted: net.Socket,
  options: tls.TLSSocketOptions,
  fallback: Buffer,
  target: () => ReadTarget | undefined,
): tls.TLSSocket {
  adopting = (accepted as unknown as { _handle: unknown })._handle;
  (accepted as unknown as { _handle: unknown })._handle = null;
  accepted.destroy();
  try {
    const socket = new AdoptedTlsSocket(
      undefined as unknown as net.Socket,
      {
        ...options,
        isServer: true,
        onread: {
          buffer: () => target()?.readBuffer() ?? fallback,
          callback: (n: number, buf: Uint8Array) => {
            target()!.onRead(n, buf as Buffer);
            return true;
          },
        },
      } as tls.TLSSocketOptions,
    );
    // It took over a connection that is already up.
    (socket as unknown as { connecting: boolean }).connecting = false;
    return socket;
  } finally {
    adopting = undefined;
  }
}
