// A sparse volume file in a temp dir, opened as a FileBlockDevice that knows nothing was written
// yet: what the store's unit tests write through. `remove` closes it and deletes the dir.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AllocationMap } from '../../sidecar/src/store/allocation-map';
import { FileBlockDevice } from '../../sidecar/src/store/file-device';

export interface TempVolumeFile {
  file: string;
  dev: FileBlockDevice;
  remove(): void;
}

export function tempVolumeFile(prefix: string, sizeBytes: number): TempVolumeFile {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const file = path.join(dir, 'data.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, sizeBytes);
  const dev = new FileBlockDevice(
    fs.openSync(file, 'r+'),
    sizeBytes,
    false,
    file,
    AllocationMap.fresh(sizeBytes),
  );
  return {
    file,
    dev,
    remove: () => {
      dev.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
