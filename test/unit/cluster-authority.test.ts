// The CA Secret the operator signs with, read back: a Secret that holds no usable CA is an error
// that says what is wrong with it (the operator refuses to start with it), never a CA half-used.
import type * as k8s from '@kubernetes/client-node';
import { parseSecret } from '../../operator/src/certificates/cluster-authority';
import {
  createAuthority,
  issueCertificate,
  type Authority,
} from '../../lib/tls/certificate-authority';

const b64 = (s: string) => Buffer.from(s).toString('base64');
const secret = (data: Record<string, string>): k8s.V1Secret => ({
  metadata: { name: 'lockstep-ca' },
  data: Object.fromEntries(Object.entries(data).map(([k, v]) => [k, b64(v)])),
});

describe('the CA Secret', () => {
  let ca: Authority;
  let other: Authority;
  beforeAll(async () => {
    ca = await createAuthority('test');
    other = await createAuthority('other');
  });

  it('gives the CA, and publishes its ca.crt bundle when it has one', () => {
    expect(parseSecret(secret({ 'tls.crt': ca.certPem, 'tls.key': ca.keyPem }), 'ns')).toEqual({
      ...ca,
      bundlePem: ca.certPem,
    });
    const bundle = ca.certPem + other.certPem;
    expect(
      parseSecret(secret({ 'tls.crt': ca.certPem, 'tls.key': ca.keyPem, 'ca.crt': bundle }), 'ns')
        .bundlePem,
    ).toBe(bundle);
  });

  it('says what is wrong with one that holds no usable CA', async () => {
    const leaf = await issueCertificate(ca, { role: 'agent', name: 'n' }, { validMs: 60_000 });
    const expired = await createAuthority('old', -1_000);
    const cases: Array<[Record<string, string>, RegExp]> = [
      [{ 'tls.crt': ca.certPem }, /it needs tls.crt and tls.key/],
      [{ 'tls.crt': 'garbage', 'tls.key': ca.keyPem }, /holds no usable CA/],
      [{ 'tls.crt': leaf.certPem, 'tls.key': leaf.keyPem }, /tls.crt is not a CA certificate/],
      [{ 'tls.crt': ca.certPem, 'tls.key': other.keyPem }, /tls.key is not the key of tls.crt/],
      [{ 'tls.crt': expired.certPem, 'tls.key': expired.keyPem }, /the CA expired on/],
    ];
    for (const [data, why] of cases) {
      expect(() => parseSecret(secret(data), 'lockstep-system')).toThrow(why);
      expect(() => parseSecret(secret(data), 'lockstep-system')).toThrow(
        /Secret lockstep-system\/lockstep-ca holds no usable CA/,
      );
    }
  });
});
