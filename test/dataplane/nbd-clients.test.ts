// The NBD server against the real clients users have: qemu-io, qemu-img, nbdinfo, nbdcopy,
// fio's nbd engine and libnbd (python3-libnbd).
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AgentProcess, fioVerify, run, systemPython } from '../harness/agent-process';

const MiB = 1024 * 1024;

describe('NBD export with real clients', () => {
  const agent = new AgentProcess();
  let work: string;
  beforeAll(async () => {
    work = mkdtempSync(path.join(os.tmpdir(), 'lockstep-clients-'));
    await agent.start();
  });
  afterAll(async () => {
    await agent.dispose();
    rmSync(work, { recursive: true, force: true });
  });

  it('qemu-io writes patterns and reads them back, and a wrong pattern is caught', async () => {
    const uri = await agent.createVolume('qio', '64MiB');
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0xab 0 64k',
      '-c',
      'write -P 0x5c 1m 12k',
      '-c',
      'write -z 4m 1m',
      uri,
    ]);
    const out = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'read -P 0xab 0 64k',
      '-c',
      'read -P 0x5c 1m 12k',
      '-c',
      'read -P 0 4m 1m',
      uri,
    ]);
    expect(out).not.toContain('verification failed');
    await expect(run('qemu-io', ['-f', 'raw', '-c', 'read -P 0xcd 0 64k', uri])).rejects.toThrow(
      /Pattern verification failed/,
    );
    // Unaligned, byte-granular I/O (minimum block size is 1).
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 3 5', uri]);
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'read -P 0x11 3 5',
      '-c',
      'read -P 0xab 0 3',
      '-c',
      'read -P 0xab 8 100',
      uri,
    ]);
  });

  it('qemu-img converts an image in and out, and compares identical', async () => {
    const uri = await agent.createVolume('img', '32MiB');
    const src = path.join(work, 'src.img');
    // Random data with holes between, so zero detection and sparse writes are exercised.
    const image = Buffer.alloc(32 * MiB);
    for (let off = 0; off < image.length; off += 3 * MiB) randomBytes(MiB + 4096).copy(image, off);
    writeFileSync(src, image);
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri]);
    await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);
    const out = path.join(work, 'out.img');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    expect(readFileSync(out).equals(image)).toBe(true);
    // And compare notices a difference.
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 20m 4k', uri]);
    await expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri])).rejects.toThrow(
      /Content mismatch at offset 20971520/,
    );
  });

  it('nbdinfo shows the size, the flags and the block sizes', async () => {
    const uri = await agent.createVolume('info', '48MiB');
    const info = JSON.parse(await run('nbdinfo', ['--json', uri])) as {
      protocol: string;
      exports: Record<string, unknown>[];
    };
    expect(info.protocol).toBe('newstyle-fixed');
    const exp = info.exports[0];
    expect(exp).toMatchObject({
      'export-name': 'info',
      'export-size': 48 * MiB,
      is_read_only: false,
      can_flush: true,
      can_fua: true,
      can_multi_conn: true,
      can_trim: true,
      can_zero: true,
      block_size_minimum: 1,
      block_size_preferred: 4096,
      block_size_maximum: 32 * MiB,
    });
    const list = await run('nbdinfo', [
      '--list',
      '--json',
      `nbd+unix://?socket=${agent.nbdSocket}`,
    ]);
    const names = (JSON.parse(list) as { exports: { 'export-name': string }[] }).exports.map(
      (e) => e['export-name'],
    );
    expect(names).toEqual(expect.arrayContaining(['info', 'img', 'qio']));
  });

  it('nbdcopy round-trips an image', async () => {
    const uri = await agent.createVolume('copy', '16MiB');
    const src = path.join(work, 'copy-src.img');
    const data = randomBytes(16 * MiB);
    data.fill(0, 4 * MiB, 9 * MiB);
    writeFileSync(src, data);
    await run('nbdcopy', [src, uri]);
    const back = path.join(work, 'copy-back.img');
    await run('nbdcopy', [uri, back]);
    expect(readFileSync(back).equals(data)).toBe(true);
  });

  it('fio random writes at queue depth 16 verify with crc32c', async () => {
    const uri = await agent.createVolume('fio', '64MiB');
    const json = await fioVerify(uri, '64M', ['--output-format=json']);
    // fio prints a connection notice before its JSON report.
    const job = (
      JSON.parse(json.slice(json.indexOf('{'))) as {
        jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[];
      }
    ).jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBe(64 * MiB);
    expect(job.read.io_bytes).toBe(64 * MiB); // the verify pass read everything back
  });

  it("serves two concurrent clients on one export, each seeing the other's flushed writes", async () => {
    const uri = await agent.createVolume('multi', '16MiB');
    const script = `import nbd, sys
uri = sys.argv[1]
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(uri); b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
failed = []
def done(err):
    if err.value != 0: failed.append(err.value)
    return 1
for i in range(256):
    h, tag = (a, 0xA0) if i % 2 == 0 else (b, 0xB0)
    h.aio_pwrite(bytes([tag | (i % 16)]) * 4096, i * 65536, completion=done)
while a.aio_in_flight() + b.aio_in_flight() > 0:
    for h in (a, b):
        if h.aio_in_flight() > 0:
            h.poll(10)
assert not failed, failed
a.flush()
for i in range(256):
    want = bytes([(0xA0 if i % 2 == 0 else 0xB0) | (i % 16)]) * 4096
    for h in (a, b):
        got = h.pread(4096, i * 65536)
        assert got == want, (i, got[:4], want[:4])
a.shutdown(); b.shutdown()
print("ok")
`;
    expect((await run(systemPython, ['-c', script, uri])).trim()).toBe('ok');
  });
});
