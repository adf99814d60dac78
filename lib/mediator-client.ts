// A promise-based client of a mediator (mediator/src/mediator.ts), with a deadline on every
// call and errors turned back into LockstepErrors. Used by agents, the operator and ctl.
import type * as grpc from '@grpc/grpc-js';
import { mediatorProto, type MediatorClient as RawMediatorClient } from '../proto';
import type { MediatorRecord__Output } from '../proto/gen/lockstep/v1/MediatorRecord';
import type { CompareAndSwapResponse__Output } from '../proto/gen/lockstep/v1/CompareAndSwapResponse';
import { CLIENT_CHANNEL_OPTIONS, unaryCall, type Callback } from './grpc-errors';
import { channelCredentials, channelOptions, type Transport } from './tls/transport';

export type MediatorRecord = MediatorRecord__Output;
export interface SwapAnswer {
  granted: boolean;
  /** The new record if granted, else the one that stands. */
  record: MediatorRecord;
}

export class MediatorClient {
  private readonly raw: RawMediatorClient;

  constructor(
    readonly target: string,
    transport: Transport,
    private readonly timeoutMs = 5_000,
  ) {
    this.raw = new (mediatorProto().Mediator)(target, channelCredentials(transport, ['mediator']), {
      ...CLIENT_CHANNEL_OPTIONS,
      ...channelOptions(transport),
      // Tighter than the control clients' 2 s: a primary suspended on the mediator, or a
      // replica counting its grace, must see it the moment it is back.
      'grpc.initial_reconnect_backoff_ms': 200,
      'grpc.max_reconnect_backoff_ms': 1_000,
    });
  }

  private call<Res>(
    invoke: (options: grpc.CallOptions, cb: Callback<Res>) => unknown,
  ): Promise<Res> {
    return unaryCall(
      { target: this.target, kind: 'mediator', flag: 'the mediator address' },
      this.timeoutMs,
      invoke,
    );
  }

  record(group: string): Promise<MediatorRecord> {
    return this.call<MediatorRecord>((o, cb) => this.raw.GetRecord({ group }, o, cb));
  }

  async records(): Promise<MediatorRecord[]> {
    return (
      await this.call<{ records: MediatorRecord[] }>((o, cb) => this.raw.ListRecords({}, o, cb))
    ).records;
  }

  /**
   * Epoch `expectedEpoch + 1` (at least `atLeast`: one past the newest this copy has seen) for
   * `primary`, if the group is still at `expectedEpoch`.
   */
  async compareAndSwap(
    group: string,
    expectedEpoch: number,
    primary: string,
    inSync: string[],
    atLeast = 0,
  ): Promise<SwapAnswer> {
    const r = await this.call<CompareAndSwapResponse__Output>((o, cb) =>
      this.raw.CompareAndSwap({ group, expectedEpoch, primary, inSync, atLeast }, o, cb),
    );
    if (!r.record) throw new Error(`the mediator at ${this.target} answered without a record`);
    return { granted: r.granted, record: r.record };
  }

  close(): void {
    this.raw.close();
  }
}
