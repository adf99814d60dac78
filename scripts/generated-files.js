// What every generator in scripts/ does with its output: writes the files, or with `--check`
// compares them with what is committed and exits 1 naming each stale one.
'use strict';
const { readFileSync, writeFileSync, existsSync } = require('node:fs');

/** `files`: [absolute path, content] pairs; `regenerate`: the command that rewrites them. */
function writeOrCheck(files, regenerate) {
  let stale = 0;
  for (const [file, text] of files) {
    if (!process.argv.includes('--check')) writeFileSync(file, text);
    else if (!existsSync(file) || readFileSync(file, 'utf8') !== text) {
      console.error(`${file} is out of date: run ${regenerate}`);
      stale++;
    }
  }
  process.exit(stale ? 1 : 0);
}

module.exports = { writeOrCheck };
