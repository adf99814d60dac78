// Files generated from one source each are committed as the generators make them: the CRDs
// (deploy/crds and the chart's copies), the chart's values, schema, RBAC and dashboard, and the
// CRD and metrics references in docs/. A change to a source without `npm run gen:*` fails here.
import { execFile } from 'node:child_process';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from '../../lib/package-root';

const execFileAsync = promisify(execFile);

describe('generated files', () => {
  it.each(['gen-crds.js', 'gen-chart.js', 'gen-docs.js'])(
    '%s --check finds them current',
    async (script) => {
      const run = execFileAsync('node', [path.join(packageRoot, 'scripts', script), '--check']);
      await expect(run).resolves.toMatchObject({ stderr: '' });
    },
  );
});
