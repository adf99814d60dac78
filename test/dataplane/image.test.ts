// The container image as a user gets it: built twice to the same digest, run by runc as a pod
// would run it (non-root, read-only root, no capabilities), and an agent in it serving a
// volume to a real NBD client through the host-mounted socket, and /metrics.
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { packageVersion } from '../../lib/package-root';
import { ADMIN, lockstepBin, run } from '../harness/agent-process';
import { Container, IMAGE_UID, buildImage, type BuiltImage } from '../harness/container-image';
import { freePort, waitFor } from '../harness/processes';
import { productNode } from '../harness/product-runtime';
import { tlsDirFor } from '../harness/test-certificates';

interface ImageConfig {
  config: { User: string; Entrypoint: string[]; Labels: Record<string, string> };
}

describe('container image', () => {
  const dirs: string[] = [];
  const tmp = (prefix: string) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
    dirs.push(dir);
    return dir;
  };
  let image: BuiltImage;
  const containers: Container[] = [];
  const container = async (...args: Parameters<typeof Container.create>) => {
    const c = await Container.create(...args);
    containers.push(c);
    return c;
  };

  beforeAll(async () => {
    image = await buildImage(tmp('lockstep-image-'));
  }, 600_000);
  afterEach(async () => {
    await Promise.all(containers.splice(0).map((c) => c.dispose()));
  });
  afterAll(() => {
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  });

  it('builds reproducibly: the same inputs give the same digest, layout and archive alike', async () => {
    expect(image.digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    const again = await buildImage(tmp('lockstep-image-'));
    expect(again.digest).toBe(image.digest);
    expect(readFileSync(again.archive).equals(readFileSync(image.archive))).toBe(true);

    const index = JSON.parse(readFileSync(path.join(image.layout, 'index.json'), 'utf8')) as {
      manifests: { digest: string; annotations: Record<string, string> }[];
    };
    expect(index.manifests).toEqual([
      expect.objectContaining({
        digest: image.digest,
        annotations: { 'org.opencontainers.image.ref.name': packageVersion },
      }),
    ]);
    const blob = (digest: string) =>
      readFileSync(path.join(image.layout, 'blobs', 'sha256', digest.slice('sha256:'.length)));
    const manifest = JSON.parse(blob(image.digest).toString()) as { config: { digest: string } };
    const config = JSON.parse(blob(manifest.config.digest).toString()) as ImageConfig;
    expect(config.config).toMatchObject({
      User: `${IMAGE_UID}:${IMAGE_UID}`,
      Entrypoint: ['/usr/local/bin/node', '/opt/lockstep/bin/lockstep.js'],
    });
    expect(config.config.Labels['org.opencontainers.image.version']).toBe(packageVersion);
    const listing = await run('tar', ['-tf', image.archive]);
    expect(listing.split('\n')).toEqual(expect.arrayContaining(['./index.json', './oci-layout']));
  });

  it('prints its version, run as the image runs it', async () => {
    const c = (await container(image, { args: ['--version'] })).start(
      path.join(tmp('lockstep-ctr-'), 'version.log'),
    );
    expect(await c.proc.exited).toBe(0);
    expect(c.proc.log().trim()).toBe(packageVersion);
  });

  it('runs an agent as a non-root user on a read-only root, serving NBD through a host-mounted socket and /metrics', async () => {
    const dataDir = tmp('lockstep-ctr-data-');
    // A copy: the container's user must own its key, and the test CA's files stay the test's.
    const tlsDir = path.join(tmp('lockstep-ctr-tls-'), 'tls');
    cpSync(await tlsDirFor({ role: 'agent', name: 'image-node' }), tlsDir, { recursive: true });
    const [grpcPort, metricsPort] = [await freePort(), await freePort()];
    const c = await container(image, {
      args: [
        'agent',
        '--node',
        'image-node',
        '--data-dir',
        dataDir,
        '--listen',
        `127.0.0.1:${grpcPort}`,
        '--metrics-listen',
        `127.0.0.1:${metricsPort}`,
        '--tls-dir',
        tlsDir,
      ],
      writable: [dataDir],
      readOnly: [tlsDir],
    });
    c.start(path.join(tmp('lockstep-ctr-'), 'agent.log'));
    const metrics = () =>
      waitFor(
        'the agent in the container to serve /metrics',
        async () => {
          if (c.proc.child.exitCode !== null) throw new Error(`exited:\n${c.proc.log()}`);
          const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
          return res.ok ? res.text() : undefined;
        },
        30_000,
        100,
      );
    expect(await metrics()).toContain('lockstep_volumes');

    const status = readFileSync(`/proc/${await c.pid()}/status`, 'utf8');
    expect(/^Uid:\s+(.*)$/m.exec(status)?.[1].split(/\s+/)).toEqual(Array(4).fill(`${IMAGE_UID}`));
    expect(/^CapEff:\s+(\S+)$/m.exec(status)?.[1]).toBe('0000000000000000');
    const write = await c.exec(
      '/usr/local/bin/node',
      '-e',
      "require('fs').writeFileSync('/opt/x', '')",
    );
    expect(write.code).not.toBe(0);
    expect(write.stderr).toContain('EROFS');

    await run(productNode(), [
      lockstepBin,
      'ctl',
      '--agent',
      `127.0.0.1:${grpcPort}`,
      '--tls-dir',
      await tlsDirFor(ADMIN),
      'volume',
      'create',
      'vol1',
      '--size',
      '16MiB',
    ]);
    const uri = `nbd+unix:///vol1?socket=${path.join(dataDir, 'nbd.sock')}`;
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1m 2m', '-c', 'flush', uri]);
    const read = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 1m 2m', uri]);
    expect(read).not.toContain('verification failed');
    expect(await metrics()).toContain('lockstep_volumes{state="Ready",node="image-node"} 1');
  });
});
