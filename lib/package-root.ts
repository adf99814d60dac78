// Finds the installed package's root, whether this code runs compiled (dist/lib/) or from
// sources under a TypeScript transformer (lib/): protos and package.json are read from there.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';

function findRoot(): string {
  for (let dir = __dirname; ; dir = path.dirname(dir)) {
    if (existsSync(path.join(dir, 'package.json')) && existsSync(path.join(dir, 'proto')))
      return dir;
    if (path.dirname(dir) === dir)
      throw new Error(`lockstep package root not found above ${__dirname}`);
  }
}

export const packageRoot = findRoot();

export const packageVersion: string = (
  JSON.parse(readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { version: string }
).version;
