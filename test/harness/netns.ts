// A host of its own for partition tests: a network namespace joined to this one by a veth
// pair. Processes started inside it reach the host's side of the link, and only that; cutting
// the link from inside cuts every connection at once (the mediator's too), while the host's
// own address stays up for the test. Needs root, as the tests do.
import { execFileSync } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';

function ip(...args: string[]): void {
  execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export class NetNamespace {
  private constructor(
    readonly name: string,
    private readonly inner: string,
    /** The host's end of the link. */
    readonly hostIp: string,
    /** The namespace's end. */
    readonly nsIp: string,
  ) {}

  static create(): NetNamespace {
    const id = randomBytes(4).toString('hex');
    // A /30 of its own, picked at random: tests running side by side do not share one.
    const base = `10.${randomInt(200, 250)}.${randomInt(0, 256)}.${randomInt(0, 64) * 4}`;
    const [a, b, c, d] = base.split('.').map(Number);
    const hostIp = `${a}.${b}.${c}.${d + 1}`;
    const nsIp = `${a}.${b}.${c}.${d + 2}`;
    const n = new NetNamespace(`ls-${id}`, `lsn${id}`, hostIp, nsIp);
    const outer = `lsh${id}`;
    ip('netns', 'add', n.name);
    try {
      ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', n.inner);
      ip('link', 'set', n.inner, 'netns', n.name);
      ip('addr', 'add', `${hostIp}/30`, 'dev', outer);
      ip('link', 'set', outer, 'up');
      n.exec('ip', 'addr', 'add', `${nsIp}/30`, 'dev', n.inner);
      n.exec('ip', 'link', 'set', n.inner, 'up');
      n.exec('ip', 'link', 'set', 'lo', 'up');
    } catch (err) {
      n.dispose();
      throw err;
    }
    return n;
  }

  /** `command` run inside the namespace: the prefix for a process that lives there. */
  wrap(command: string, args: string[]): [string, string[]] {
    return ['ip', ['netns', 'exec', this.name, command, ...args]];
  }

  private exec(...cmd: string[]): void {
    ip('netns', 'exec', this.name, ...cmd);
  }

  /** The link goes down: nothing passes either way until `heal`. */
  cut(): void {
    this.exec('ip', 'link', 'set', this.inner, 'down');
  }

  heal(): void {
    this.exec('ip', 'link', 'set', this.inner, 'up');
  }

  /** Removes the namespace and its link (processes inside must be gone first). */
  dispose(): void {
    try {
      ip('netns', 'del', this.name);
    } catch {
      // already gone
    }
  }
}
