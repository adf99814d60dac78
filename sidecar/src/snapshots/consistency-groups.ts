// The agent's consistency groups: named sets of its volumes whose snapshots are taken at one
// write-order point. Kept in <data-dir>/groups.json, replaced atomically.
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { LockstepError } from '../../../lib/errors';
import { writeFileAtomic } from '../../../lib/atomic-file';
import { validateVolumeName } from '../store/volume-store';

const GroupsFile = z.object({
  groups: z.array(z.object({ name: z.string(), volumes: z.array(z.string()).min(1) })),
});

export interface Group {
  name: string;
  volumes: string[];
}

export class ConsistencyGroups {
  private constructor(
    private readonly file: string,
    private groups: Group[],
  ) {}

  static load(dataDir: string): ConsistencyGroups {
    const file = path.join(dataDir, 'groups.json');
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return new ConsistencyGroups(file, []);
      throw err;
    }
    let parsed: z.infer<typeof GroupsFile>;
    try {
      parsed = GroupsFile.parse(JSON.parse(text));
    } catch (err) {
      throw new LockstepError(
        'LOCKSTEP_ERR_METADATA_CORRUPT',
        `consistency groups file ${file} is not valid: ${err instanceof Error ? err.message : String(err)}`,
      );
    }
    return new ConsistencyGroups(file, parsed.groups);
  }

  list(): Group[] {
    return this.groups.map((g) => ({ ...g, volumes: [...g.volumes] }));
  }

  get(name: string): Group {
    const group = this.groups.find((g) => g.name === name);
    if (!group)
      throw new LockstepError(
        'LOCKSTEP_ERR_GROUP_NOT_FOUND',
        `no consistency group ${JSON.stringify(name)} on this agent`,
      );
    return group;
  }

  /** Creates a group; the same group again is a no-op, other volumes under its name an error. */
  async create(name: string, volumes: string[]): Promise<Group> {
    validateVolumeName(name);
    if (volumes.length === 0)
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `group ${name} needs at least one volume`,
      );
    for (const v of volumes) validateVolumeName(v);
    if (new Set(volumes).size !== volumes.length)
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `group ${name} names a volume twice`,
      );
    const existing = this.groups.find((g) => g.name === name);
    if (existing) {
      if (existing.volumes.join('\0') === volumes.join('\0')) return existing;
      throw new LockstepError(
        'LOCKSTEP_ERR_GROUP_EXISTS',
        `group ${name} already exists with volumes ${existing.volumes.join(', ')}`,
      );
    }
    const group = { name, volumes: [...volumes] };
    await this.save([...this.groups, group]);
    return group;
  }

  async delete(name: string): Promise<void> {
    this.get(name);
    await this.save(this.groups.filter((g) => g.name !== name));
  }

  private async save(groups: Group[]): Promise<void> {
    await writeFileAtomic(this.file, JSON.stringify({ groups }, null, 2));
    this.groups = groups;
  }
}
