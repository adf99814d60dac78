#!/usr/bin/env node
// Generates TypeScript types for every proto under proto/ into proto/gen/ (not committed).
'use strict';
const { execFileSync } = require('node:child_process');
const { readdirSync, rmSync } = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..', 'proto');
const out = path.join(root, 'gen');

function protoFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) return p === out ? [] : protoFiles(p);
    return e.name.endsWith('.proto') ? [path.relative(root, p)] : [];
  });
}

rmSync(out, { recursive: true, force: true });
const bin = require.resolve('@grpc/proto-loader/build/bin/proto-loader-gen-types.js');
execFileSync(
  process.execPath,
  [
    bin,
    '--grpcLib=@grpc/grpc-js',
    '--longs=Number',
    '--enums=String',
    '--defaults',
    '--oneofs',
    '--includeDirs',
    root,
    '--outDir',
    out,
    ...protoFiles(root),
  ],
  { stdio: 'inherit', cwd: root },
);
