// Metadata contexts without a socket: the negotiation's request layout and query matching, the
// block status reply's encoding, and base:allocation read off an allocation map.
import { AllocationFlag, type Extent, type MetaContexts } from '../../sidecar/src/block-device';
import {
  matchMetaContexts,
  parseMetaContextRequest,
} from '../../sidecar/src/frontend/nbd/meta-contexts';
import {
  blockStatusReply,
  errorChunk,
  MAX_STATUS_DESCRIPTORS,
  statusDescriptors,
} from '../../sidecar/src/frontend/nbd/structured-reply';
import { AllocationMap, EXTENT_BYTES } from '../../sidecar/src/store/allocation-map';
import { AllocationStatus } from '../../sidecar/src/store/allocation-status';

const HOLE_ZERO = AllocationFlag.HOLE | AllocationFlag.ZERO;

/** A device with base:allocation and a family of per-snapshot contexts it lists. */
class FakeContexts implements MetaContexts {
  snapshots = ['daily', 'weekly'];
  list(): string[] {
    return ['base:allocation', ...this.snapshots.map((s) => `lockstep:changed:${s}`)];
  }
  has(name: string): boolean {
    if (name === 'base:allocation') return true;
    const m = /^lockstep:changed:(.+)$/.exec(name);
    return m !== null && (this.snapshots.includes(m[1]) || m[1] === 'hidden');
  }
  extents(): Promise<Extent[]> {
    return Promise.resolve([]);
  }
}

function request(exportName: string, queries: string[]): Buffer {
  const parts = [lengthPrefixed(exportName), u32(queries.length), ...queries.map(lengthPrefixed)];
  return Buffer.concat(parts);
}
function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}
function lengthPrefixed(s: string): Buffer {
  const b = Buffer.from(s);
  return Buffer.concat([u32(b.length), b]);
}

describe('metadata context negotiation', () => {
  it('parses the export name and queries, and says what is wrong with a bad request', () => {
    expect(parseMetaContextRequest(request('vol', []))).toEqual({ exportName: 'vol', queries: [] });
    expect(parseMetaContextRequest(request('vol', ['base:allocation', 'x-a:b']))).toEqual({
      exportName: 'vol',
      queries: ['base:allocation', 'x-a:b'],
    });
    const good = request('vol', ['base:allocation']);
    expect(parseMetaContextRequest(good.subarray(0, good.length - 1))).toMatch(/query 1 of 1/);
    expect(parseMetaContextRequest(Buffer.concat([good, Buffer.alloc(1)]))).toMatch(/left after/);
    expect(parseMetaContextRequest(lengthPrefixed('vol'))).toMatch(/export name/);
    expect(parseMetaContextRequest(Buffer.alloc(2))).toMatch(/export name/);
    // A count far beyond what the data holds fails on the first missing query.
    const huge = Buffer.concat([lengthPrefixed('vol'), u32(0xffffffff)]);
    expect(parseMetaContextRequest(huge)).toMatch(/query 1 of 4294967295/);
    expect(parseMetaContextRequest(request('vol', ['x:' + 'a'.repeat(4096)]))).toMatch(/query 1/);
  });

  it('lists everything without queries, a family by its prefix, and members by name', () => {
    const dev = new FakeContexts();
    expect(matchMetaContexts(dev, [], false)).toEqual([
      'base:allocation',
      'lockstep:changed:daily',
      'lockstep:changed:weekly',
    ]);
    expect(matchMetaContexts(dev, ['base:'], false)).toEqual(['base:allocation']);
    expect(matchMetaContexts(dev, ['lockstep:changed:'], false)).toEqual([
      'lockstep:changed:daily',
      'lockstep:changed:weekly',
    ]);
    // Named: an unlisted member the device accepts; unknown names and namespaces match nothing.
    expect(
      matchMetaContexts(
        dev,
        ['lockstep:changed:hidden', 'lockstep:changed:gone', 'base:other', 'qemu:dirty-bitmap:x'],
        false,
      ),
    ).toEqual(['lockstep:changed:hidden']);
    // Each context once, in the order first named.
    expect(
      matchMetaContexts(dev, ['lockstep:changed:weekly', 'base:', 'base:allocation'], false),
    ).toEqual(['lockstep:changed:weekly', 'base:allocation']);
  });

  it('selects named contexts only: wildcards and an empty query list select nothing', () => {
    const dev = new FakeContexts();
    expect(matchMetaContexts(dev, [], true)).toEqual([]);
    expect(matchMetaContexts(dev, ['base:', 'lockstep:'], true)).toEqual([]);
    expect(
      matchMetaContexts(
        dev,
        ['base:allocation', 'lockstep:changed:daily', 'base:allocation'],
        true,
      ),
    ).toEqual(['base:allocation', 'lockstep:changed:daily']);
  });

  it('refuses a query without a namespace, and a device without contexts matches nothing', () => {
    const dev = new FakeContexts();
    expect(matchMetaContexts(dev, ['allocation'], false)).toMatch(/namespace/);
    expect(matchMetaContexts(dev, [':allocation'], true)).toMatch(/namespace/);
    expect(matchMetaContexts(dev, ['base allocation:'], false)).toMatch(/namespace/);
    expect(matchMetaContexts(undefined, [], false)).toEqual([]);
    expect(matchMetaContexts(undefined, ['base:allocation'], true)).toEqual([]);
  });
});

describe('block status reply', () => {
  const cookie = { cookieHi: 0x01020304, cookieLo: 0x05060708 };

  it('clips the extents to the request and merges neighbours that share flags', () => {
    const extents = [
      { length: 100, flags: 3 },
      { length: 50, flags: 3 },
      { length: 200, flags: 0 },
      { length: 1000, flags: 3 },
    ];
    expect(statusDescriptors(extents, 400, false)).toEqual([
      { length: 150, flags: 3 },
      { length: 200, flags: 0 },
      { length: 50, flags: 3 },
    ]);
    expect(statusDescriptors(extents, 120, false)).toEqual([{ length: 120, flags: 3 }]);
    // Fewer than the request covers is fine: the client asks again from where they end.
    expect(statusDescriptors([{ length: 10, flags: 0 }], 400, false)).toEqual([
      { length: 10, flags: 0 },
    ]);
    // The input is left alone.
    expect(extents[0]).toEqual({ length: 100, flags: 3 });
  });

  it('gives one extent, within the request, for REQ_ONE', () => {
    const extents = [
      { length: 100, flags: 3 },
      { length: 50, flags: 3 },
      { length: 200, flags: 0 },
    ];
    expect(statusDescriptors(extents, 1000, true)).toEqual([{ length: 150, flags: 3 }]);
    expect(statusDescriptors(extents, 30, true)).toEqual([{ length: 30, flags: 3 }]);
  });

  it('stops at the descriptor limit', () => {
    const extents = Array.from({ length: MAX_STATUS_DESCRIPTORS + 10 }, (_, i) => ({
      length: 1,
      flags: i & 1,
    }));
    const out = statusDescriptors(extents, extents.length, false);
    expect(out).toHaveLength(MAX_STATUS_DESCRIPTORS);
  });

  it('refuses a device that reports nothing or an empty extent', () => {
    expect(() => statusDescriptors([], 10, false)).toThrow(/no extent/);
    expect(() => statusDescriptors([{ length: 0, flags: 0 }], 10, false)).toThrow(/0 bytes/);
    expect(() => statusDescriptors([{ length: 1.5, flags: 0 }], 10, false)).toThrow(/1.5 bytes/);
  });

  it('frames one chunk per context, ids from 1, only the last one done', () => {
    const reply = blockStatusReply(
      cookie,
      [
        [{ length: 4096, flags: 3 }],
        [
          { length: 1024, flags: 1 },
          { length: 3072, flags: 0 },
        ],
      ],
      4096,
      false,
    );
    expect(reply.length).toBe(20 + 4 + 8 + (20 + 4 + 16));
    const first = reply.subarray(0, 32);
    expect(first.readUInt32BE(0)).toBe(0x668e33ef);
    expect(first.readUInt16BE(4)).toBe(0); // more chunks follow
    expect(first.readUInt16BE(6)).toBe(5); // BLOCK_STATUS
    expect(first.readBigUInt64BE(8)).toBe(0x0102030405060708n);
    expect(first.readUInt32BE(16)).toBe(12);
    expect(first.readUInt32BE(20)).toBe(1);
    expect([first.readUInt32BE(24), first.readUInt32BE(28)]).toEqual([4096, 3]);
    const second = reply.subarray(32);
    expect(second.readUInt16BE(4)).toBe(1); // DONE
    expect(second.readUInt32BE(16)).toBe(20);
    expect(second.readUInt32BE(20)).toBe(2);
    expect([1024, 1, 3072, 0]).toEqual([24, 28, 32, 36].map((at) => second.readUInt32BE(at)));
  });

  it('frames an error chunk with its errno and message', () => {
    const chunk = errorChunk(cookie, 22, 'bad');
    expect(chunk.readUInt32BE(0)).toBe(0x668e33ef);
    expect(chunk.readUInt16BE(4)).toBe(1);
    expect(chunk.readUInt16BE(6)).toBe(2 ** 15 + 1);
    expect(chunk.readUInt32BE(16)).toBe(6 + 3);
    expect(chunk.readUInt32BE(20)).toBe(22);
    expect(chunk.readUInt16BE(24)).toBe(3);
    expect(chunk.toString('utf8', 26)).toBe('bad');
    // Long messages are cut to the spec's string limit.
    expect(errorChunk(cookie, 5, '€'.repeat(5000)).readUInt16BE(24)).toBeLessThanOrEqual(4096);
  });
});

describe('base:allocation from the allocation map', () => {
  const size = 4 * 1024 * 1024 + 1000; // a partial last extent

  it('reports never-written extents as holes that read as zeroes, written ones as data', async () => {
    const map = AllocationMap.fresh(size);
    const status = new AllocationStatus(map, size);
    expect(status.list()).toEqual(['base:allocation']);
    expect(status.has('base:allocation')).toBe(true);
    expect(status.has('base:other')).toBe(false);
    expect(await status.extents('base:allocation', 0, size)).toEqual([
      { length: size, flags: HOLE_ZERO },
    ]);
    map.markWritten(EXTENT_BYTES + 10, 1); // extent 1
    map.markWritten(40 * EXTENT_BYTES, 2 * EXTENT_BYTES); // extents 40, 41: across a word
    map.markWritten(size - 1, 1); // the partial last extent
    expect(await status.extents('base:allocation', 0, size)).toEqual([
      { length: EXTENT_BYTES, flags: HOLE_ZERO },
      { length: EXTENT_BYTES, flags: 0 },
      { length: 38 * EXTENT_BYTES, flags: HOLE_ZERO },
      { length: 2 * EXTENT_BYTES, flags: 0 },
      { length: 64 * EXTENT_BYTES - 42 * EXTENT_BYTES, flags: HOLE_ZERO },
      { length: 1000, flags: 0 },
    ]);
    // A range that starts and ends inside extents.
    expect(await status.extents('base:allocation', EXTENT_BYTES + 5, EXTENT_BYTES)).toEqual([
      { length: EXTENT_BYTES - 5, flags: 0 },
      { length: 5, flags: HOLE_ZERO },
    ]);
  });

  it('reports everything as data while the map is unknown', async () => {
    const status = new AllocationStatus(AllocationMap.unknown(size), size);
    expect(await status.extents('base:allocation', 100, size - 100)).toEqual([
      { length: size - 100, flags: 0 },
    ]);
  });

  it('refuses another context and a range outside the volume', async () => {
    const status = new AllocationStatus(AllocationMap.fresh(size), size);
    await expect(status.extents('base:other', 0, 1)).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_INVALID_ARGUMENT',
    });
    await expect(status.extents('base:allocation', size - 1, 2)).rejects.toMatchObject({
      code: 'LOCKSTEP_ERR_OUT_OF_RANGE',
    });
  });
});
